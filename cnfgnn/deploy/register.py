"""Register SuperNode public keys with a SuperLink (``engine.launch.secure=true``).

Usage::

    python -m cnfgnn.deploy.register CONNECTION NAME=KEY.pub [NAME=KEY.pub ...]

Runs Flower's own command ``flwr supernode register KEY.pub CONNECTION --name NAME --format
json`` once per key, all in this one process: the CLI is imported once (about 1-3 s on 2
shared cores) instead of once per key, and each registration then takes ~0.05 s. Prints one
line per key, ``registered {"name": ..., "node-id": ...}``; exits with 1 at the first key
the SuperLink refuses (the message names it).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def register_keys(connection: str, keys: list[tuple[str, str]]) -> list[int]:
    """``flwr supernode register`` for each ``(name, public key path)``; the node ids."""
    from flwr.cli.app import app
    from typer.main import get_command

    cmd = get_command(app)
    ids = []
    for name, key in keys:
        out, real = io.StringIO(), sys.__stdout__
        sys.__stdout__ = out  # Flower prints its JSON reply to sys.__stdout__
        try:
            with contextlib.redirect_stdout(out):
                cmd.main(
                    ["supernode", "register", key, connection, "--name", name, "--format", "json"],
                    prog_name="flwr",
                    standalone_mode=False,
                )
        finally:
            sys.__stdout__ = real
        text = out.getvalue()
        try:
            reply = json.JSONDecoder().raw_decode(text[text.index("{") :])[0]
        except ValueError:
            reply = {"success": False, "error-message": text.strip()}
        if not reply.get("success"):
            raise RuntimeError(
                f"the SuperLink refused SuperNode key {key} ({name}): "
                f"{reply.get('error-message', text.strip())}"
            )
        ids.append(int(reply["node-id"]))
        print("registered " + json.dumps({"name": name, "node-id": ids[-1]}), flush=True)
    return ids


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or any("=" not in a for a in args[1:]):
        print(__doc__, file=sys.stderr)
        return 2
    keys = [tuple(a.split("=", 1)) for a in args[1:]]
    try:
        register_keys(args[0], keys)  # type: ignore[arg-type]
    except Exception as ex:  # noqa: BLE001 - one line for the launcher's error message
        print(f"cnfgnn.deploy.register: {ex}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
