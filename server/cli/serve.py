"""`transplant serve`: run the runtime until SIGTERM/SIGINT, then drain and exit."""
from __future__ import annotations

import logging
import signal
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the live model over gRPC (with no arguments: the embedded family)")
    p.add_argument("--config", help="YAML or JSON config file; flags override it")
    p.add_argument("--model", help="live model spec (default zoo:v2)")
    p.add_argument("--donor", action="append", metavar="NAME=SPEC", help="register a donor (repeatable)")
    p.add_argument("--donor-root", action="append", metavar="DIR", help="folder donors may come from (repeatable; watched)")
    p.add_argument("--task-root", action="append", metavar="DIR", help="folder JSONL task files may come from")
    p.add_argument("--state-dir", help="journal, snapshots and token (default ~/.local/state/transplant)")
    p.add_argument("--grpc-listen", help="HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--http-listen", help="HOST:PORT for /metrics and /alerts (default 127.0.0.1:9400)")
    p.add_argument("--token-file", help="admin bearer token file (created 0600 if missing)")
    p.add_argument("--tls-cert", help="server certificate (PEM): serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="accept .bin/.pt weights (pickle can run code)")
    p.add_argument("--max-batch-size", type=int, help="most requests decoded together in one batch (default 16)")
    p.add_argument("--engine", choices=("embedded", "vllm"),
                   help="what decodes: embedded (transformers, continuous batching; default) or vllm "
                        "(needs `bash deploy/setup.sh --vllm`)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="the live model's dtype (default: the dtype its weights are stored in)")
    p.add_argument("--fleet", metavar="etcd://HOST:PORT[,HOST:PORT...]",
                   help="join a fleet of replicas coordinated through etcd (with --fleet-name, --fleet-store); "
                        "name every member of an etcd cluster, separated by commas, to fail over between them")
    p.add_argument("--fleet-name", metavar="NAME", help="the fleet to join (replicas of one model share it)")
    p.add_argument("--fleet-store", metavar="DIR", help="the fleet's shared tensor store (every replica mounts it)")
    p.add_argument("--replica-name", metavar="NAME", help="this replica's name in the fleet (default: the host name)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.set_defaults(fn=cmd_serve)


def config_from_args(args):
    from transplant_core.errors import InvalidArgument

    from ..config import load_config

    donors = None
    if args.donor:
        donors = []
        for item in args.donor:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise InvalidArgument(f"--donor {item!r}: expected NAME=SPEC (for example v1=zoo:v1)")
            donors.append({"name": name, "path": spec})
    fleet = {k: v for k, v in (("etcd", getattr(args, "fleet", None)), ("name", getattr(args, "fleet_name", None)),
                               ("store", getattr(args, "fleet_store", None)),
                               ("replica", getattr(args, "replica_name", None))) if v is not None}
    if fleet and "etcd" not in fleet:
        cfg_fleet = load_config(args.config).fleet if args.config else None
        if cfg_fleet is None:
            flag = {"name": "--fleet-name", "store": "--fleet-store", "replica": "--replica-name"}[next(iter(fleet))]
            raise InvalidArgument(f"{flag} needs --fleet etcd://HOST:PORT (or fleet: in the config file)")
    return load_config(
        args.config, fleet=fleet or None, model=args.model, donors=donors, donor_roots=args.donor_root, task_roots=args.task_root,
        state_dir=args.state_dir, grpc_listen=args.grpc_listen, http_listen=args.http_listen,
        admin_token_file=args.token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        allow_pickle=args.allow_pickle, max_batch_size=args.max_batch_size, engine=args.engine,
        dtype=getattr(args, "dtype", None))


def cmd_serve(args) -> int:
    from ..app import Server

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    server = Server(cfg)

    def on_signal(signum, _frame):
        print(f"received {signal.Signals(signum).name}: draining (up to {cfg.drain_timeout_s:.0f} s)", file=sys.stderr)
        import threading

        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.exit_on_engine_death = True
    print(f"loading {cfg.model} ...", file=sys.stderr)
    try:
        server.start()
    except BaseException:
        if not server._stopped.is_set():
            raise
    if server._stopped.is_set():
        server.wait()
        print("stopped during start-up", file=sys.stderr)
        return 0
    rt = server.runtime
    scheme = "grpcs" if cfg.tls_cert else "grpc"
    host = cfg.grpc_listen.rpartition(":")[0]
    http_host = cfg.http_listen.rpartition(":")[0]
    print(f"serving {cfg.model} (generation {rt.gens.live.id}, {len(rt.table.modules)} transplantable modules)\n"
          f"  {scheme}://{host}:{server.grpc_port}  Inference, Admin, health, reflection\n"
          f"  http://{http_host}:{server.http_port}/metrics  and POST /alerts\n"
          f"  donors: {', '.join(d.name for d in rt.donors.list()) or 'none'}; drop-in roots: "
          f"{', '.join(map(str, rt.donors.roots))}\n"
          f"  admin token {'created in' if server.token_created else 'read from'} {cfg.token_file}\n"
          f"  state: {cfg.state_dir}\n"
          f"try: transplant admin status", file=sys.stderr, flush=True)
    server.wait()
    if rt.engine_dead:
        print("stopped: the engine died (exit status 1; restart the server)", file=sys.stderr)
        return 1
    print("stopped", file=sys.stderr)
    return 0
