"""``varq-run --cfg job``: the configuration that will run, as the pipeline sees it.

Hydra's own ``--cfg job`` prints the composed YAML. The values that run differ from it: validation fills the
dataclass defaults, resolves interpolations (``paths.cache``), and lets a model set the reconstruction budget of
the methods that reconstruct (var_digits: ``quant.iters`` 300 where the method file says the paper's 5000). So for
``--cfg job`` varq prints the validated, typed configuration instead; everything else (``--cfg hydra``/``all``, a
config directory or name of one's own, ``--info``) is Hydra's.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

SHOWN = ("--cfg", "-c")
PACKAGE = ("--package", "-p")
HEADER = "# the configuration that runs (validated: defaults filled, interpolations resolved, model budget applied)"


def _parse(argv: Sequence[str]) -> tuple[list[str], str | None] | None:
    """(overrides, package) when ``argv`` asks for ``--cfg job`` and nothing else of Hydra's; otherwise None."""
    overrides: list[str] = []
    shown = package = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in SHOWN + PACKAGE:
            if not args:
                return None
            value = args.pop(0)
            shown, package = (value, package) if arg in SHOWN else (shown, value)
        elif arg.startswith("--cfg="):
            shown = arg.split("=", 1)[1]
        elif arg.startswith("--package="):
            package = arg.split("=", 1)[1]
        elif arg == "--resolve":
            continue  # always resolved here
        elif arg.startswith("-"):
            return None  # -m, -cp, -cn, --info, ...: Hydra's business
        else:
            overrides.append(arg)
    return (overrides, package) if shown == "job" else None


def effective_config(overrides: Sequence[str]) -> dict:
    """The validated RunConfig of ``varq-run OVERRIDES`` as plain data (``+shard=k`` selects work, not config)."""
    from varq.compose import compose_run_config

    run_overrides = [o for o in overrides if not o.lstrip("+~").startswith("shard=")]
    return json.loads(json.dumps(dataclasses.asdict(compose_run_config(run_overrides)), default=str))


def show_effective_config(argv: Sequence[str]) -> bool:
    """Print the effective config for ``--cfg job`` (True), or leave ``argv`` to Hydra (False).

    A configuration error is one line on stderr and exit status 2, as for a run. A composition problem Hydra
    explains better (a sweep value without ``-m``, an unknown group option) goes back to Hydra.
    """
    parsed = _parse(argv)
    if parsed is None:
        return False
    overrides, package = parsed
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from varq.config import ConfigError

    try:
        config = effective_config(overrides)
    except ConfigError as err:
        print(f"varq: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException):
        return False
    node = config
    for part in (package or "").split("."):
        if part:
            if not isinstance(node, dict) or part not in node:
                print(f"varq: error: --package {package}: no such key in the run config "
                      f"(top-level keys: {', '.join(config)})", file=sys.stderr)
                sys.exit(2)
            node = node[part]
    print(HEADER + (f"\n# @package {package}" if package else ""))
    print(yaml.safe_dump(node, sort_keys=False, allow_unicode=True) if isinstance(node, dict) else node)
    return True
