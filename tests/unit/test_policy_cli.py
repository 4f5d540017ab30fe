"""``overlaycni policy validate / explain / render`` as a user runs them."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from overlaycni.cli.main import app
from overlaycni.policy.store_codec import namespace_to_dict, pod_to_dict
from tests.policy_cases import case

runner = CliRunner()


def inventory_file(tmp_path, name, *, dual=False, extra_policy=""):
    c = case(name)
    m = c.model(dual=dual)
    data = {
        "namespaces": [namespace_to_dict(n) for n in m.namespaces],
        "pods": [pod_to_dict(p) for p in m.pods],
        "policies": list(yaml.safe_load_all(c.manifest(m) + extra_policy)),
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), m


def test_validate_prints_defaulted_policies(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(case("egress-without-policy-types-isolates-ingress-too").policy)
    res = runner.invoke(app, ["policy", "validate", "-f", str(f), "-o", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["valid"] and out["policies"][0]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert out["policies"][0]["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 81}]
    res = runner.invoke(app, ["policy", "validate", "-f", str(f)])
    assert res.exit_code == 0 and "policyTypes:\n  - Ingress\n  - Egress" in res.stdout


def test_validate_errors_name_fields_and_exit_2(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n"
        "spec:\n  ingress:\n  - ports: [{port: 80}, {port: 90, endPort: 80}]\n"
    )
    res = runner.invoke(app, ["policy", "validate", "-f", str(f), "-o", "json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout) == {
        "valid": False,
        "errors": [{"field": "spec.ingress[0].ports[1].endPort", "message": "80 must be greater than or equal to port (90)"}],
    }
    res = runner.invoke(app, ["policy", "validate", "-f", str(f)])
    assert res.exit_code == 2 and "spec.ingress[0].ports[1].endPort" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["policy", "validate", "-f", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "cannot read" in res.output


def test_explain_allow_names_policy_and_rule(tmp_path):
    path, _ = inventory_file(tmp_path, "pod-or-namespace")
    res = runner.invoke(app, ["policy", "explain", "y/c", "x/a", "80/TCP", "--from", path, "-o", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["verdict"] == "allow" and out["policy"] == "x/x-a-pod-or-ns" and out["rule"] == "ingress[0]"
    res = runner.invoke(app, ["policy", "explain", "y/c", "x/a", "80", "--from", path])
    assert res.exit_code == 0 and "ALLOW" in res.stdout and "x/x-a-pod-or-ns ingress[0]" in res.stdout


def test_explain_deny_by_default_exit_1(tmp_path):
    path, m = inventory_file(tmp_path, "pod-or-namespace")
    res = runner.invoke(app, ["policy", "explain", "z/a", str(m.pod("x/a").ip), "80/tcp", "--from", path, "-o", "json"])
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    assert out["verdict"] == "deny" and out["policy"] is None and out["dst"] == "x/a"
    assert out["ingress"]["policies"] == ["x/x-a-pod-or-ns"]


@pytest.mark.parametrize(
    "args, field",
    [
        (["x/nope", "x/a", "80/TCP"], "src"),
        (["x/a", "bogus", "80/TCP"], "dst"),
        (["x/a", "x/b", "80/ICMP"], "port"),
        (["x/a", "x/b", "99999"], "port"),
    ],
)
def test_explain_bad_input(tmp_path, args, field):
    path, _ = inventory_file(tmp_path, "no-policies")
    res = runner.invoke(app, ["policy", "explain", *args, "--from", path, "-o", "json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout)["errors"][0]["field"] == field


def test_explain_bad_inventory(tmp_path):
    f = tmp_path / "inv.yaml"
    f.write_text("pods:\n- {namespace: x, name: a, ip: 10.0.0.1, labels: {k: 'bad value!'}}\npolicies:\n- {kind: NetworkPolicy}\n")
    res = runner.invoke(app, ["policy", "explain", "x/a", "x/a", "80", "--from", str(f), "-o", "json"])
    assert res.exit_code == 2
    fields = {e["field"] for e in json.loads(res.stdout)["errors"]}
    assert {"pods[0].labels.k", "policies[0].apiVersion", "policies[0].metadata"} <= fields


def test_render_prints_nft_json(tmp_path):
    path, _ = inventory_file(tmp_path, "default-deny-all")
    res = runner.invoke(app, ["policy", "render", "--node", "node-1", "--from", path])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["nftables"][0] == {"add": {"table": {"family": "inet", "name": "overlaycni"}}}
    res = runner.invoke(app, ["policy", "render", "--node", "node-1", "--from", path, "-o", "table"])
    assert "rules" in res.stdout
    # by default what an agent applies (flow log rules included); --no-flow-logs: the table without them
    assert '"log"' in json.dumps(doc)
    bare = json.loads(runner.invoke(app, ["policy", "render", "--node", "node-1", "--from", path, "--no-flow-logs"]).stdout)
    assert '"log"' not in json.dumps(bare) and len(bare["nftables"]) < len(doc["nftables"])


def test_apply_list_delete_in_a_sqlite_datastore(tmp_path):
    db = f"sqlite:///{tmp_path}/state.db"
    base = ["--datastore", db]
    res = runner.invoke(app, [*base, "cluster", "create", "--name", "dev", "--network-plugin", "azure", "--network-plugin-mode", "overlay"])
    assert res.exit_code == 0, res.output
    f = tmp_path / "p.yaml"
    f.write_text(case("stacked-policies").policy)
    res = runner.invoke(app, [*base, "policy", "apply", "-f", str(f), "--cluster", "dev", "-o", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["applied"] == [
        {"policy": "x/x-a-81-from-y", "action": "created"},
        {"policy": "x/x-a-80-from-z", "action": "created"},
    ]
    res = runner.invoke(app, [*base, "policy", "apply", "-f", str(f), "--cluster", "dev"])
    assert res.exit_code == 0 and "x/x-a-80-from-z configured" in res.stdout
    res = runner.invoke(app, [*base, "policy", "list", "--cluster", "dev", "-o", "json"])
    names = [p["metadata"]["name"] for p in json.loads(res.stdout)["policies"]]
    assert names == ["x-a-80-from-z", "x-a-81-from-y"]
    # the stored value is the defaulted manifest under the documented key
    from overlaycni.datastore import open_datastore

    store = open_datastore(db)
    try:
        kv = store.get("/overlaycni/clusters/dev/policies/x/x-a-80-from-z")
        assert json.loads(kv.value)["spec"]["policyTypes"] == ["Ingress"]
    finally:
        store.close()
    res = runner.invoke(app, [*base, "policy", "delete", "x/x-a-80-from-z", "--cluster", "dev"])
    assert res.exit_code == 0
    res = runner.invoke(app, [*base, "policy", "delete", "x/x-a-80-from-z", "--cluster", "dev"])
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, [*base, "policy", "list", "--cluster", "dev"])
    assert res.exit_code == 0 and "NetworkPolicies in dev" in res.stdout
    res = runner.invoke(app, [*base, "policy", "list", "--cluster", "dev", "-o", "json"])
    assert [p["metadata"]["name"] for p in json.loads(res.stdout)["policies"]] == ["x-a-81-from-y"]
    # invalid input stores nothing; an unknown cluster is a clear error
    bad = tmp_path / "bad.yaml"
    bad.write_text(case("no-policies").policy + "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: q}\nspec: {ingress: 5}\n")
    res = runner.invoke(app, [*base, "policy", "apply", "-f", str(bad), "--cluster", "dev"])
    assert res.exit_code == 2 and "spec.ingress" in res.output
    res = runner.invoke(app, [*base, "policy", "apply", "-f", str(f), "--cluster", "nope"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_bare_pod_names_resolve_only_when_unambiguous(tmp_path):
    """``policy explain --lab`` takes a bare NAME that one namespace has
    (a lab names pods that way); here through the library, without a lab."""
    from overlaycni.errors import ConfigError
    from overlaycni.policy.explain import explain, qualify
    from overlaycni.policy.inventory import load_inventory

    path, m = inventory_file(tmp_path, "no-policies")
    with open(path) as fh:
        inv = load_inventory(fh.read())
    assert qualify(inv, "x/a", field="src") == "x/a" and qualify(inv, str(m.pod("x/a").ip), field="src") == str(m.pod("x/a").ip)
    with pytest.raises(ConfigError) as err:
        qualify(inv, "a", field="src")
    (e,) = err.value.errors
    assert e.field == "src" and "x/a, y/a, z/a" in e.message
    one = load_inventory(yaml.safe_dump({"pods": [{"namespace": "x", "name": "web", "ip": "10.244.0.5", "node": "n1"}]}))
    verdict, data = explain(one, src="web", dst="x/web", port="80", bare_names=True)
    assert verdict.allowed and data["src"] == data["dst"] == "x/web"
    with pytest.raises(ConfigError):  # without bare_names (--from, --cluster) a NAME is not an endpoint
        explain(one, src="web", dst="x/web", port="80")


# ----- dual stack ----------------------------------------------------------------------------

V6_ONLY_FROM_YB = """---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-a-from-y-b-v6, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: 'fd12:3456:789a::af4:315/128'}
"""


def test_explain_ipv6_addresses_and_family(tmp_path):
    """An IPv6 address names its pod and makes the connection IPv6; an
    IPv6 ipBlock decides over IPv6 only; the JSON says which family."""
    path, m = inventory_file(tmp_path, "no-policies", dual=True, extra_policy=V6_ONLY_FROM_YB)
    yb, xa = m.pod("y/b"), m.pod("x/a")
    assert str(yb.ip_v6) == "fd12:3456:789a::af4:315"
    res = runner.invoke(app, ["policy", "explain", str(yb.ip_v6), str(xa.ip_v6), "80/TCP", "--from", path, "-o", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["src"], out["dst"], out["family"], out["policy"], out["rule"]) == ("y/b", "x/a", "ipv6", "x/x-a-from-y-b-v6", "ingress[0]")
    # the same pods by name: IPv4 by default (denied: the block is IPv6), IPv6 with --family
    res = runner.invoke(app, ["policy", "explain", "y/b", "x/a", "80", "--from", path, "-o", "json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["family"] == "ipv4"
    res = runner.invoke(app, ["policy", "explain", "y/b", "x/a", "80", "--from", path, "--family", "ipv6"])
    assert res.exit_code == 0 and "ALLOW y/b -> x/a 80/TCP over IPv6" in res.stdout
    # another pod's IPv6 address is refused (the control), and a name with an IPv6 address is IPv6
    res = runner.invoke(app, ["policy", "explain", "z/b", str(xa.ip_v6), "80", "--from", path, "-o", "json"])
    out = json.loads(res.stdout)
    assert res.exit_code == 1 and out["family"] == "ipv6" and out["ingress"]["policies"] == ["x/x-a-from-y-b-v6"]
    res = runner.invoke(app, ["policy", "explain", "fd00::7", "x/a", "80", "--from", path, "-o", "json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["src"] == "fd00::7"


@pytest.mark.parametrize(
    "args, field, words",
    [
        (["10.244.2.11", "fd12:3456:789a::af4:10a", "80"], "dst", "IPv4 or IPv6, not both"),
        (["10.244.2.11", "x/a", "80", "--family", "ipv6"], "family", "ipv6 contradicts src 10.244.2.11"),
        (["x/a", "x/b", "80", "--family", "ipv7"], "family", "expected ipv4 or ipv6"),
        (["fe80::1%eth0", "x/b", "80"], "src", "neither NAMESPACE/POD nor an IPv4 or IPv6 address"),
    ],
)
def test_explain_family_errors(tmp_path, args, field, words):
    path, _ = inventory_file(tmp_path, "no-policies", dual=True)
    res = runner.invoke(app, ["policy", "explain", *args, "--from", path, "-o", "json"])
    assert res.exit_code == 2, res.output
    (err,) = json.loads(res.stdout)["errors"]
    assert err["field"] == field and words in err["message"]


def test_explain_ipv6_of_a_single_stack_pod_is_an_error(tmp_path):
    path, _ = inventory_file(tmp_path, "no-policies")
    res = runner.invoke(app, ["policy", "explain", "x/a", "y/b", "80", "--family", "ipv6", "--from", path, "-o", "json"])
    assert res.exit_code == 2
    (err,) = json.loads(res.stdout)["errors"]
    assert err["field"] == "src" and "x/a has no IPv6 address" in err["message"]
    res = runner.invoke(app, ["policy", "explain", "x/a", "y/b", "80", "--from", path, "-o", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["family"] == "ipv4"


def test_inventory_rejects_a_shared_ipv6_address(tmp_path):
    f = tmp_path / "inv.yaml"
    f.write_text(yaml.safe_dump({"pods": [
        {"namespace": "x", "name": "a", "ip": "10.0.0.1", "ipv6": "fd00::1"},
        {"namespace": "x", "name": "b", "ip": "10.0.0.2", "ipv6": "fd00:0::1"},
        {"namespace": "x", "name": "c", "ip": "10.0.0.3", "ipv6": "10.0.0.4"},
    ]}))
    res = runner.invoke(app, ["policy", "explain", "x/a", "x/a", "80", "--from", str(f), "-o", "json"])
    assert res.exit_code == 2
    errs = {e["field"]: e["message"] for e in json.loads(res.stdout)["errors"]}
    assert errs == {"pods[1].ipv6": "fd00::1 is already the address of x/a", "pods[2].ipv6": "'10.0.0.4' is not an IPv6 address (without a zone)"}


def test_render_of_a_dual_stack_inventory_has_both_families(tmp_path):
    path, _ = inventory_file(tmp_path, "default-deny-all", dual=True)
    res = runner.invoke(app, ["policy", "render", "--node", "node-1", "--from", path])
    assert res.exit_code == 0
    names = {c["add"]["map"]["name"] for c in json.loads(res.stdout)["nftables"] if "map" in c.get("add", {})}
    assert names == {"ingress-pods", "egress-pods", "ingress-pods-v6", "egress-pods-v6"}
