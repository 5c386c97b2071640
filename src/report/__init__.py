"""`convergent-report`: a sweep's runs as one result (README "Reports across runs").

Modules, one job each: `keys` (what a metric key is: per-pair or headline, family, layer, measure,
statistic; the one place these rules live, also used by `convergent.wandb_workspace`), `runs`
(finding and reading run directories), `groups` (runs grouped by their overrides without the seed),
`aggregate` (mean / sd / min / max over runs), `figures`, `html`, `wandb_report` and `cli`.
Importing this package is cheap: nothing here imports matplotlib, W&B or torch at module level.
"""
