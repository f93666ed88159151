"""``edgefl fleet init|add-device|revoke``: provision a fleet.

``init`` creates the fleet directory (a CA, the broker's certificate and key, the server's
signing and sealing keys, its broker logins, ``mosquitto.conf``, the password and ACL files);
``add-device ID`` gives one device its login and bundle; ``revoke ID`` takes the login away and
makes a running broker reload. Every command is safe to re-run and overwrites nothing that
exists (:mod:`edgefl_server.provisioning`).
"""
from __future__ import annotations

import argparse
import sys

from edgefl.cli.options import add_logging_option, env_option, setup_logging
from edgefl_server import provisioning


def main(argv) -> int:
    """``edgefl fleet ARGS``; 0 on success, 2 when provisioning refuses (the message says why)."""
    parser = argparse.ArgumentParser(prog="edgefl fleet", description=__doc__.splitlines()[0])
    env_option(parser, "--dir", env="EDGEFL_FLEET_DIR", default="fleet", metavar="DIR",
               help="the fleet directory (private keys inside: keep it on the server)")
    add_logging_option(parser)
    commands = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = commands.add_parser("init", help="create the fleet directory (safe to re-run)")
    env_option(init, "--fleet", env="EDGEFL_FLEET", required=True, metavar="NAME",
               help="fleet name")
    init.add_argument("--host", default="localhost",
                      help="the broker's host name or IP address as devices reach it (goes into "
                           "its certificate next to localhost and 127.0.0.1)")
    init.add_argument("--port", type=int, default=provisioning.DEFAULT_PORT,
                      help="the broker's TLS port")
    add = commands.add_parser("add-device", help="a login and a bundle for one device")
    add.add_argument("client_id", metavar="ID")
    revoke = commands.add_parser("revoke", help="remove a device's login (reloads the broker)")
    revoke.add_argument("client_id", metavar="ID")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.action == "init":
            fleet, created = provisioning.init_fleet(args.dir, args.fleet, host=args.host,
                                                     port=args.port)
            print(f"fleet {fleet.fleet} in {fleet.directory}: "
                  + (f"wrote {', '.join(created)}" if created else "complete, nothing changed"))
            if created and provisioning.reload_broker(fleet):
                print("the running broker reloaded its logins and ACL")
            print(f"broker:  mosquitto -c {fleet.mosquitto_conf}   (TLS on {fleet.url})")
            print(f"server:  edgefl server --fleet {fleet.fleet} --fleet-dir {fleet.directory} "
                  f"--broker {fleet.url} --state-dir STATE_DIR")
            print(f"devices: edgefl fleet --dir {fleet.directory} add-device ID")
        elif args.action == "add-device":
            bundle, created = provisioning.add_device(args.dir, args.client_id)
            command = (bundle / "command.txt").read_text().strip()
            print(f"{'wrote' if created else 'kept the existing'} bundle {bundle}; copy it to "
                  f"the device and run:\n  {command}")
        else:
            reloaded = provisioning.revoke_device(args.dir, args.client_id)
            print(f"revoked {args.client_id}: " + (
                "the running broker reloaded its logins and disconnected it" if reloaded else
                "no running broker found; the login is gone when the broker next starts or "
                "reloads (kill -HUP its pid)"))
    except (provisioning.ProvisioningError, ValueError, OSError) as exc:
        print(f"edgefl fleet: {exc}", file=sys.stderr)
        return 2
    return 0
