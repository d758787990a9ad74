"""Side-by-side benchmarks: each runs the two things it compares in one process and
prints their ratio (median, min, max over repeats). See bench/README.md."""
