"""Studies: experiments about the method, run on the real pipeline (`load_clip`,
`PromptScorer`, `run_search`), with their shipped results under `results/`.

`template_table`: how much the wording matters to a CLIP, per toy task.
`search_control`: whether the search finds wording a trained model understands,
against a random-init control.
"""
