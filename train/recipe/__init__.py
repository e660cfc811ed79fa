"""The recipe runner (`python -m train.recipe RECIPE`): every stage of a recipe in order, as its own process, with
skipping of finished stages and the summary (summary.md, plots) at the end."""
