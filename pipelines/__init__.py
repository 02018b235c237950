"""Ray job entry points: `python -m pipelines.<job> --config pipelines/configs/<job>.yaml`."""
