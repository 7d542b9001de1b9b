"""The `medsyn` command (also `python -m medsyn`): each stage as a command, and the chain runner."""

import argparse
import json
import sys

from medsyn.data.manifest import ManifestError
from medsyn.paths import REPO_ROOT


def _add_curate(sub):
    p = sub.add_parser("curate", help="curate raw sources into an image-text dataset")
    p.add_argument(
        "--manifest",
        action="append",
        required=True,
        metavar="PATH",
        help="manifest YAML (repeat for several sources; a name in data_manifests/ also works)",
    )
    p.add_argument("--raw", required=True, metavar="DIR", help="raw directory; every file under it is accounted for")
    p.add_argument("--out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--size", type=int, default=512, help="output side in pixels (default 512, MediSyn's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    p.add_argument(
        "--near-duplicate-correlation",
        type=float,
        default=0.995,
        help="thumbnail correlation confirming a perceptual-hash near duplicate (default 0.995)",
    )
    p.add_argument("--keep-near-duplicates", action="store_true", help="remove exact duplicates only")
    p.add_argument(
        "--vlm",
        metavar="DIR",
        help="caption with a local vision-language model as well (Med-Art): its description joins the template",
    )
    p.add_argument("--vlm-cache", metavar="PATH", help="its descriptions' cache (default <out>.vlm_captions.jsonl)")
    p.add_argument(
        "--report-llm",
        metavar="DIR",
        help="rewrite each image's anatomy-pathology report with a local instruction-tuned language model",
    )
    p.add_argument("--report-cache", metavar="PATH", help="its rewrites' cache (default <out>.llm_reports.jsonl)")
    p.add_argument("--no-progress", action="store_true")


def _add_corpus(sub):
    from medsyn.data.corpus import SOURCES

    p = sub.add_parser("corpus", help="write the embedded procedural raw corpus")
    p.add_argument("--out", required=True, metavar="DIR", help="raw directory to create (must be empty)")
    p.add_argument("--patients", type=int, default=40, help="patients per source (default 40)")
    p.add_argument("--size", type=int, default=128, help="base side of written images in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sources", default=",".join(SOURCES), help="comma-separated sources (default: all)")
    p.add_argument(
        "--first-patient", type=int, default=0, help="number of the first patient (other patients: past the first's)"
    )
    p.add_argument("--no-progress", action="store_true")


def _add_reproduce(sub):
    p = sub.add_parser("reproduce", help="run the notebook chain for a profile (smoke, default, paper)")
    p.add_argument("--profile", required=True, help="profile name in notebooks/profiles/ or a YAML path")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<profile>)")
    p.add_argument("--kernel", help="Jupyter kernel (default python3)")
    part = p.add_mutually_exclusive_group()
    part.add_argument(
        "--from",
        dest="start",
        metavar="NOTEBOOK",
        help="run from this notebook on, reusing what the earlier ones wrote (e.g. 06_fidelity)",
    )
    part.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run just these notebooks")
    part.add_argument("--resume", action="store_true", help="continue from the notebook that failed or did not run")
    _add_overrides(p)


def _add_overrides(p):
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="override a parameter for every notebook that declares it (VALUE read as YAML, as papermill does)",
    )


def _overrides(args) -> dict:
    import yaml

    return {name: yaml.safe_load(value) for name, value in args.parameter}


def _add_notebook(sub):
    p = sub.add_parser(
        "notebook",
        help="write one stage notebook with a profile's parameters into the run directory, to open in JupyterLab",
    )
    p.add_argument("notebook", help="stage notebook name, e.g. 06_fidelity")
    p.add_argument("--profile", required=True, help="profile name in notebooks/profiles/ or a YAML path")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<profile>)")
    p.add_argument("--kernel", help="Jupyter kernel (default python3)")
    p.add_argument("--force", action="store_true", help="replace an existing copy (and its edits)")
    _add_overrides(p)


def _add_preflight(sub):
    p = sub.add_parser("preflight", help="list every local model, weight file and raw source a profile needs and lacks")
    p.add_argument("--profile", required=True, help="profile name in notebooks/profiles/ or a YAML path")
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/<profile>)")
    _add_overrides(p)


def _add_validate(sub):
    p = sub.add_parser("validate", help="validate manifests against the schema")
    p.add_argument("manifests", nargs="+", metavar="PATH")


def _add_sample(sub):
    p = sub.add_parser("sample", help="sample each class prompt of a curated dataset into a generated dataset")
    p.add_argument("--pipeline", required=True, metavar="DIR", help="a saved diffusers pipeline directory")
    p.add_argument("--dataset", required=True, metavar="DIR", help="curated dataset whose class prompts are sampled")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the generated dataset")
    p.add_argument("--model", required=True, help="generator name recorded with every image, e.g. ldm-compact")
    p.add_argument("--per-prompt", type=int, default=8, help="images per class prompt (default 8)")
    p.add_argument("--seed", type=int, default=0, help="base seed; each image's own seed is recorded")
    p.add_argument(
        "--scheduler",
        default="euler",
        help="euler (default, MediSyn's), dpmsolver++, ddim or pipeline (the pipeline's own)",
    )
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50, MediSyn's)")
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7, MediSyn's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per pipeline call")
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights' precision (default float32; bfloat16 on a GPU is about 2.5x faster, README 'Performance')",
    )


def _add_tables(sub):
    p = sub.add_parser("tables", help="write the README's marked result tables from a run's figures directory")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"), metavar="FILE", help="default: the README")
    p.add_argument("--figures", default=str(REPO_ROOT / "figures"), metavar="DIR", help="default: figures/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medsyn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_curate,
        _add_corpus,
        _add_reproduce,
        _add_notebook,
        _add_preflight,
        _add_validate,
        _add_sample,
        _add_tables,
    ):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ManifestError, FileNotFoundError, FileExistsError, ValueError) as err:  # DatasetError is a ValueError
        print(f"medsyn {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "curate":
        from medsyn.data.curate import curate
        from medsyn.data.manifest import resolve_manifest

        captioner = None
        if args.vlm:
            from medsyn.models.captioner import VLMCaptioner

            captioner = VLMCaptioner(args.vlm)
        report_writer = None
        if args.report_llm:
            from medsyn.models.report_writer import ReportWriter

            report_writer = ReportWriter(args.report_llm)
        result = curate(
            [resolve_manifest(m) for m in args.manifest],
            args.raw,
            args.out,
            size=args.size,
            seed=args.seed,
            progress=not args.no_progress,
            near_duplicate_correlation=None if args.keep_near_duplicates else args.near_duplicate_correlation,
            captioner=captioner,
            caption_cache=args.vlm_cache,
            report_writer=report_writer,
            report_cache=args.report_cache,
        )
        print(json.dumps(result.summary, indent=2))
    elif args.command == "corpus":
        from medsyn.data.corpus import write_corpus

        truth = write_corpus(
            args.out,
            patients=args.patients,
            seed=args.seed,
            size=args.size,
            sources=tuple(s for s in args.sources.split(",") if s),
            progress=not args.no_progress,
            first_patient=args.first_patient,
        )
        print(f"wrote {len(truth['sources'])} sources to {args.out} ({len(truth['defects'])} deliberate defects)")
    elif args.command == "reproduce":
        from medsyn.chain import ChainError, reproduce

        try:
            run_dir = reproduce(
                args.profile,
                args.out,
                kernel=args.kernel,
                start=args.start,
                only=args.only,
                overrides=_overrides(args),
                resume=args.resume,
            )
        except ChainError as err:
            print(f"medsyn reproduce: {err}", file=sys.stderr)
            return 1
        print(f"run complete: {run_dir}")
    elif args.command == "notebook":
        from medsyn.chain import write_notebook

        path = write_notebook(
            args.notebook, args.profile, args.out, overrides=_overrides(args), kernel=args.kernel, overwrite=args.force
        )
        print(f"wrote {path}\nopen it with: jupyter lab {path}")
    elif args.command == "preflight":
        from medsyn.chain import check_profile
        from medsyn.profiles import PreflightError

        missing = check_profile(args.profile, args.out, overrides=_overrides(args))
        if missing:
            print(PreflightError(args.profile, missing), file=sys.stderr)
            return 1
        print(f"profile {args.profile}: everything it reads from disk is there")
    elif args.command == "sample":
        from medsyn.data.dataset import read_records
        from medsyn.sampling import sample_class_prompts

        out = sample_class_prompts(
            args.pipeline,
            args.dataset,
            args.out,
            args.model,
            args.per_prompt,
            seed=args.seed,
            scheduler=args.scheduler,
            steps=args.steps,
            guidance_scale=args.guidance,
            batch_size=args.batch_size,
            precision=args.precision,
        )
        print(f"wrote {len(read_records(out))} images to {out}")
    elif args.command == "validate":
        from medsyn.data.manifest import load_manifest, resolve_manifest

        failed = 0
        for name in args.manifests:
            try:
                load_manifest(resolve_manifest(name))
                print(f"ok      {name}")
            except ManifestError as err:
                print(f"invalid {err}", file=sys.stderr)
                failed += 1
        return 2 if failed else 0
    elif args.command == "tables":
        from medsyn.readme import write_readme_tables

        used = write_readme_tables(args.readme, args.figures)
        print(f"wrote {len(used)} tables into {args.readme} from {args.figures}: {', '.join(used)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
