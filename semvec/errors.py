"""Errors that end a job before any work starts (exit code 2, one line)."""


class ConfigError(ValueError):
    """A bad argument, path or model: the message names the value and what is allowed."""

    exit_code = 2


def choice_error(what: str, value: object, allowed) -> ConfigError:
    names = ", ".join(str(getattr(a, "value", a)) for a in allowed)
    return ConfigError(f"unknown {what} {value!r}; allowed: {names}")


class OutputMismatch(ConfigError):
    """The output prefix holds a backfill written with another model or config, or parts whose
    manifest is gone (an --overwrite cut short)."""


class JobFailed(RuntimeError):
    """The job ran and failed (too many rows the model could not embed, a lost lease): exit 1."""

    exit_code = 1


class TaskFailed(JobFailed):
    """A Ray task of a job raised (a store that kept failing, a broken file), past its retries."""
