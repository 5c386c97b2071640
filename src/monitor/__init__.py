"""The monitor's machinery: one analysis step from the members to the written report (the step service,
the probe pass, the analyses' step, figures, tables and the background writer)."""
