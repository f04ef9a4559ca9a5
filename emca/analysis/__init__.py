"""Evaluation and reproduction of the paper's tables and figures.

eval.py:     checkpoint_eval (rebuild a run's model, measure, write eval.json) built from
             evaluation (top-1/top-5/loss, plain and rotated: Table 9), scales (learned-scale
             statistics: Figure 6), speed (FPS, FPS-dagger, FPS-double-dagger), gradcam (Figures 7-8).
make_tables: paper_reference (the published numbers), variants (which table cell a run fills),
             tables (the paper's table layouts), runs (finding runs and their results), complexity
             (params / GFLOPs without training), render (Markdown / CSV / LaTeX), curves (Figure 9).
"""
