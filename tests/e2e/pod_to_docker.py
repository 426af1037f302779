#!/usr/bin/env python3
"""Turns the one container of a Deployment manifest into `docker run` flags, so an e2e
scenario runs the image exactly as the manifest would, and fails when the manifest sets
something it does not know how to translate (so the two cannot drift apart silently).

Usage: pod_to_docker.py MANIFEST OUTDIR PREFIX CONTAINER_PORT=HOST_PORT...

Writes to OUTDIR:
  run.args     `docker run` options, one a line (image and args not included)
  cmd.args     the container's args, one a line (after the image's ENTRYPOINT)
  probe        "PATH HOST_PORT" of the readiness probe
  configmap-NAME/KEY  each ConfigMap's files, with the config's listen addresses moved to
               127.0.0.1:HOST_PORT and every `allow` list set to loopback
Volumes: a PersistentVolumeClaim becomes the docker volume PREFIX-CLAIM; a ConfigMap a
bind mount of OUTDIR/configmap-NAME (or one file of it with subPath).
"""
import os
import re
import sys

import yaml

# What each key of the pod and container becomes; a key missing here stops the test.
POD_KEYS = {"securityContext", "terminationGracePeriodSeconds", "containers", "volumes"}
CONTAINER_KEYS = {"name", "image", "args", "command", "ports", "env", "readinessProbe",
                  "livenessProbe", "resources", "securityContext", "volumeMounts"}
POD_SECURITY_KEYS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup"}
CONTAINER_SECURITY_KEYS = {"readOnlyRootFilesystem", "allowPrivilegeEscalation", "capabilities"}


def die(msg):
    sys.exit(f"pod_to_docker: {msg}")


def unknown(what, keys, known):
    extra = set(keys) - known
    if extra:
        die(f"{what} sets {sorted(extra)}, which this test does not translate to docker run")


def memory(q):
    m = re.fullmatch(r"(\d+)(Mi|Gi)", q)
    if not m:
        die(f"memory limit {q!r} is not in Mi or Gi")
    return m.group(1) + {"Mi": "m", "Gi": "g"}[m.group(2)]


def main():
    manifest, outdir, prefix, *port_args = sys.argv[1:]
    host_port = {int(c): int(h) for c, h in (a.split("=") for a in port_args)}
    docs = [d for d in yaml.safe_load_all(open(manifest)) if d]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if len(deployments) != 1:
        die(f"{manifest} has {len(deployments)} Deployments, expected 1")
    pod = deployments[0]["spec"]["template"]["spec"]
    unknown("the pod spec", pod, POD_KEYS)
    if len(pod["containers"]) != 1:
        die("expected one container")
    c = pod["containers"][0]
    unknown("the container", c, CONTAINER_KEYS)
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    run = []

    psc = pod.get("securityContext", {})
    unknown("the pod securityContext", psc, POD_SECURITY_KEYS)
    uid = psc.get("runAsUser")
    if psc.get("runAsNonRoot") and (uid is None or uid == 0):
        die("runAsNonRoot without a non-zero runAsUser")
    if uid is not None:
        run += ["--user", f"{uid}:{psc.get('runAsGroup', uid)}"]
    if "fsGroup" in psc:
        # The supplementary group fsGroup gives the processes; the volume ownership fsGroup
        # sets has no docker equivalent (the image's directories are owned by the user).
        run += ["--group-add", str(psc["fsGroup"])]
    if "terminationGracePeriodSeconds" in pod:
        run += ["--stop-timeout", str(pod["terminationGracePeriodSeconds"])]

    csc = c.get("securityContext", {})
    unknown("the container securityContext", csc, CONTAINER_SECURITY_KEYS)
    if csc.get("readOnlyRootFilesystem"):
        run.append("--read-only")
    if csc.get("allowPrivilegeEscalation") is False:
        run += ["--security-opt", "no-new-privileges"]
    caps = csc.get("capabilities", {})
    unknown("capabilities", caps, {"drop", "add"})
    for cap in caps.get("drop", []):
        run += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        run += ["--cap-add", cap]

    for e in c.get("env", []):
        if "value" not in e:
            die(f"env {e['name']} is not a plain value")
        run += ["--env", f"{e['name']}={e['value']}"]
    limits = c.get("resources", {}).get("limits", {})
    unknown("resources.limits", limits, {"memory"})
    if "memory" in limits:
        run += ["--memory", memory(limits["memory"])]
    if "command" in c:
        die("command (docker's --entrypoint) is not translated: the image's ENTRYPOINT is meant")

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        unknown("a volumeMount", m, {"name", "mountPath", "subPath", "readOnly"})
        v = volumes[m["name"]]
        ro = ":ro" if m.get("readOnly") else ""
        if "persistentVolumeClaim" in v:
            src = f"{prefix}-{v['persistentVolumeClaim']['claimName']}"
        elif "configMap" in v:
            src = os.path.join(outdir, "configmap-" + v["configMap"]["name"])
            if "subPath" in m:
                src = os.path.join(src, m["subPath"])
        else:
            die(f"volume {m['name']}: only persistentVolumeClaim and configMap are translated")
        run += ["--volume", f"{src}:{m['mountPath']}{ro}"]

    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for name, data in configmaps.items():
        d = os.path.join(outdir, "configmap-" + name)
        os.makedirs(d, exist_ok=True)
        for key, text in data.items():
            for cport in ports.values():
                if f'"0.0.0.0:{cport}"' not in text:
                    die(f"ConfigMap {name}/{key} has no listen address 0.0.0.0:{cport}")
                text = text.replace(f'"0.0.0.0:{cport}"', f'"127.0.0.1:{host_port[cport]}"')
            text = re.sub(r"(?m)^allow = .*$", 'allow = ["127.0.0.0/8"]', text)
            with open(os.path.join(d, key), "w") as f:
                f.write(text)
            os.chmod(os.path.join(d, key), 0o644)

    probe = c["readinessProbe"]["httpGet"]
    with open(os.path.join(outdir, "probe"), "w") as f:
        f.write(f"{probe['path']} {host_port[ports[probe['port']]]}\n")
    with open(os.path.join(outdir, "run.args"), "w") as f:
        f.write("".join(a + "\n" for a in run))
    with open(os.path.join(outdir, "cmd.args"), "w") as f:
        f.write("".join(a + "\n" for a in c.get("args", [])))


main()
