"""The ``overlaycni`` entry point: the global options and the command tree."""

from __future__ import annotations

import sys

import typer

from . import agent, certs, cluster, datastore, flows, ipam, lab, lab_flows, lab_policy, policy
from . import plan as plan_cmd
from .common import DatastoreOpt, EtcdCaOpt, EtcdCertOpt, EtcdKeyOpt, EtcdPasswordFileOpt, EtcdUserOpt, ReportingGroup

app = typer.Typer(
    name="overlaycni",
    help=(
        "An overlay pod network for Kubernetes-style clusters, in the model of AKS "
        "Azure CNI Overlay: pods get IPs from a private pod CIDR, one block per node; "
        "cross-node traffic is VXLAN between node IPs; traffic leaving the pod CIDR is "
        "SNATed to the node IP."
    ),
    no_args_is_help=True,
    cls=ReportingGroup,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    datastore: DatastoreOpt = None,
    etcd_ca: EtcdCaOpt = None,
    etcd_cert: EtcdCertOpt = None,
    etcd_key: EtcdKeyOpt = None,
    etcd_user: EtcdUserOpt = None,
    etcd_password_file: EtcdPasswordFileOpt = None,
) -> None:
    from ..datastore.tls import EtcdCredentials

    creds = EtcdCredentials(ca=etcd_ca, cert=etcd_cert, key=etcd_key, user=etcd_user, password_file=etcd_password_file)
    ctx.obj = {"datastore": datastore, "etcd": creds}


app.command("plan", epilog=plan_cmd.EPILOG)(plan_cmd.plan)

for group in (cluster, ipam, agent, flows, lab, lab_policy, lab_flows, policy, certs, datastore):
    group.register(app)


def main() -> None:
    """The console script (errors are printed by ``ReportingGroup``)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
