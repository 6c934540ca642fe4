"""The engine: datasets with stable ids, replayable augmentation, the save pipeline, the recipe schema,
the plan and the `Trainer`. It imports no method: methods are found through the `distill.methods`
entry points (see `distill.recipe`). Importing the package imports nothing heavy."""
