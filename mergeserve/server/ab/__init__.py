"""A/B experiments: what each alias's targets did (tally), its statistics (stats), the report, and rollouts."""
