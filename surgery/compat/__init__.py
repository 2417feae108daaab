"""APIs of the projects surgery descends from, kept working on top of surgery's own."""
