"""Published config.json files of the presets (package data)."""
