"""The bottom layer: what every package needs and none owns (file safety, the run folder's layout,
exit codes). It imports no package of this project, so data_prep, model, train and sample can all use it."""
