"""The core: model, FixMatch training, cutout store, scoring and metrics. No Label Studio here."""
