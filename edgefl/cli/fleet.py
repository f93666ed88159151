"""``edgefl fleet init|add-device|revoke|rotate-keys``: provision a fleet.

``init`` creates the fleet directory (a CA, the broker's certificate and key, the server's
signing and sealing keys, its broker logins, ``mosquitto.conf``, the password and ACL files);
``add-device ID`` gives one device its login and bundle; ``revoke ID`` takes the login away and
makes a running broker reload; ``rotate-keys`` writes the server's next signing and sealing
keys, which the server announces to the devices in a notice signed with the current key, and
``rotate-keys --finish`` ends the grace period in which updates sealed to the replaced key are
still opened. Every command is safe to re-run and overwrites nothing that exists without being
told to (:mod:`edgefl_server.provisioning`).
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
    rotate = commands.add_parser(
        "rotate-keys", help="write the server's next signing and sealing keys (the server "
                            "announces them to the devices), or --finish a rotation")
    step = rotate.add_mutually_exclusive_group()
    step.add_argument("--replace", action="store_true",
                      help="discard a pending rotation no server has published yet and write "
                           "new keys")
    step.add_argument("--finish", action="store_true",
                      help="end the grace period: delete the replaced sealing key, so updates "
                           "still sealed to it are dropped; devices that missed the notice must "
                           "be re-provisioned once the next rotation is made")
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
        elif args.action == "rotate-keys":
            _rotate_keys(args)
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


def _rotate_keys(args) -> None:
    """``edgefl fleet rotate-keys [--replace | --finish]``: say what changed and what comes next."""
    if args.finish:
        r = provisioning.finish_rotation(args.dir)
        print(f"finished the rotation to signing key {r.signing_to}: deleted the replaced "
              f"sealing key {r.sealing_from}; a running server drops updates sealed to it within "
              f"{provisioning.KEY_CHECK_INTERVAL:g} s. A device that has not read the notice "
              "yet still follows it when it reconnects (its older updates are lost), until the "
              "next rotation; after that, re-provision it")
        return
    replaced = provisioning.pending_rotation(args.dir) if args.replace else None
    r = provisioning.rotate_keys(args.dir, replace=args.replace)
    if replaced is not None:
        print(f"discarded the pending rotation to signing key {replaced.signing_to}")
    print(f"wrote the next keys in {provisioning.open_fleet(args.dir).path('server', 'next')}: "
          f"signing key {r.signing_to} will replace {r.signing_from}, sealing key "
          f"{r.sealing_to} will replace {r.sealing_from}")
    print(f"the server publishes the notice when it starts, or within "
          f"{provisioning.KEY_CHECK_INTERVAL:g} s if it runs; devices move to the new keys as "
          "they read it, and updates sealed to either key are accepted until you run:\n"
          f"  edgefl fleet --dir {args.dir} rotate-keys --finish")
