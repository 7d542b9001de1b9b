"""A language model that writes a radiology-style report from an image's structured anatomy-pathology
report (arXiv 2403.06835 prompts its generator with reports), from a local directory through
transformers' own auto classes (`AutoTokenizer`, `AutoModelForCausalLM`): any instruction-tuned causal
LM (Llama, Qwen, Mistral, Phi, a medical LLM in one of those layouts).

It sees the template report that `medsyn.data.captions.report_prompt` builds from the image's labels
and nothing else: no image, no file name, no patient key. `medsyn.data.captions.llm_reports` checks
what it writes (every finding kept, no other class named, nothing like an identifier) and keeps the
template where a rewrite is refused.
"""

from pathlib import Path

from medsyn.models.captioner import device_and_dtype, directory_id, require_model_dir

INSTRUCTION = (
    "Rewrite this structured {image_type} report as a short free-text report of one to three sentences. "
    "Keep every finding and where it is; add no other finding, no number and no date.\nReport: {report}"
)


class ReportWriter:
    """Batched reports from a local instruction-tuned causal LM.

    Args:
        model_dir: a transformers directory holding the model (`config.json`, weights) and its tokenizer.
        instruction: the request, with `{image_type}` and `{report}` filled per report.
        max_new_tokens: the longest report, in tokens.
        variants: rewrites per template report: variant 0 is greedy, variant v > 0 samples at
            `temperature` with seed v; each image gets the variant its hash picks.
        temperature: sampling temperature of the variants after the first.
        batch_size: reports per `generate` call.
        device: torch device; default CUDA when available.

    Raises:
        FileNotFoundError: `model_dir` or its `config.json` is missing (checked before anything loads).
    """

    def __init__(
        self,
        model_dir: str | Path,
        instruction: str = INSTRUCTION,
        max_new_tokens: int = 80,
        variants: int = 1,
        temperature: float = 0.7,
        batch_size: int = 8,
        device: str | None = None,
    ):
        model_dir = require_model_dir(model_dir, "language model for reports", "reports='template'")
        if variants < 1:
            raise ValueError(f"variants must be at least 1, got {variants}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, dtype = device_and_dtype(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.tokenizer.padding_side = "left"  # a decoder-only model continues each prompt from its end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.instruction, self.max_new_tokens = instruction, max_new_tokens
        self.variants, self.temperature, self.batch_size = variants, temperature, batch_size
        self.calls = 0  # generate calls so far: a cache that works leaves this at 0 on a rerun
        self.model_id = directory_id(
            model_dir,
            {"instruction": instruction, "max_new_tokens": max_new_tokens, "temperature": temperature},
        )

    def _prompt(self, report: str, image_type: str) -> str:
        text = self.instruction.format(image_type=image_type, report=report)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text

    def write(self, reports: list[str], image_types: list[str], variant: int = 0) -> list[str]:
        """One rewrite per template report: greedy for variant 0, else sampled with seed `variant`."""
        import torch

        out = []
        for start in range(0, len(reports), self.batch_size):
            prompts = [
                self._prompt(report, kind)
                for report, kind in zip(
                    reports[start : start + self.batch_size], image_types[start : start + self.batch_size], strict=True
                )
            ]
            inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            inputs = inputs.to(self.device)
            sampling = {"do_sample": False}
            if variant:
                torch.manual_seed(variant)
                sampling = {"do_sample": True, "temperature": self.temperature, "top_p": 0.95}
            with torch.no_grad():
                generated = self.model.generate(
                    **inputs,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            self.calls += 1
            new = generated[:, inputs["input_ids"].shape[1] :]
            out += [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out
