"""Reading finished and running training runs: summaries, plots, comparisons and ablation grids.

Modules: runs (a run folder's history), series (named metrics as x/y series), summary, plot, compare, ablate.
Nothing here imports torch; matplotlib and plotext load only when a picture is drawn.
"""
