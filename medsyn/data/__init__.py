"""Reading, curating and writing datasets: the lowest layer, which imports no other part of medsyn but paths and records."""
