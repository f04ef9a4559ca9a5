"""Evaluation and reproduction of the paper's tables and figures.

evaluation: top-1/top-5/loss over the validation set, plain and rotated (Table 9);
scales: the learned-scale statistics of Figure 6;  speed: the paper's three speeds (FPS, FPS-dagger,
FPS-double-dagger);  gradcam: heat maps (Figures 7-8);  checkpoint: rebuilding a model from a run's
checkpoint;  paper_reference: the published numbers;  variants / tables / runs / complexity / curves:
make_tables (the paper's tables side by side with ours, Figure 9).
"""
