"""The cdktf app entry point: `cdktf synth`, `cdktf deploy base|fleet` and `cdktf synth --hcl` run this.

It reads the fleet config from $ACTFLEET_CONFIG (default ./fleet.toml) and synthesizes the same two stacks
`actfleet synth` does (infra/stacks.py), into the directory the cdktf CLI chooses (cdktf.out/).
Most users never run it directly: `actfleet synth|plan|deploy|destroy` wrap the same stacks with a cache.
"""

import sys

from actfleet.config import load
from actfleet.errors import ActfleetError
from actfleet.infra.synth_inputs import actfleet_command, config_text
from actfleet.infra.terraform_layout import state_dir


def main() -> None:
    try:
        config = load()  # --config is not available through the cdktf CLI: $ACTFLEET_CONFIG or ./fleet.toml
    except ActfleetError as e:
        print(f"actfleet: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    from actfleet.infra.stacks import build_app  # after the config is known good: this import takes 15-25 s

    app = build_app(config, state_dir=state_dir(config), config_text=config_text(config), actfleet=actfleet_command())
    app.synth()


if __name__ == "__main__":
    main()
