"""From a scored run to curriculum stages: export, groups, report, load (torch)."""
