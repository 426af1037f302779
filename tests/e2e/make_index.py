#!/usr/bin/env python3
"""Writes an OCI image layout holding one multi-platform image: an image index tagged TAG
over the images of other layouts (each made by make_image.py), one per platform.
usage: make_index.py OUT_DIR TAG SRC_DIR:OS/ARCH[/VARIANT]...
Each SRC_DIR's first manifest becomes the index entry for its platform; all their blobs
are copied. Prints the index digest. Push it with `skopeo copy --all oci:OUT_DIR:TAG ...`.
"""
import hashlib
import json
import os
import shutil
import sys


def main():
    out, tag, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
    blobs = os.path.join(out, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    entries = []
    for src in sources:
        path, platform = src.rsplit(":", 1)
        parts = platform.split("/")
        for name in os.listdir(os.path.join(path, "blobs", "sha256")):
            shutil.copyfile(os.path.join(path, "blobs", "sha256", name), os.path.join(blobs, name))
        with open(os.path.join(path, "index.json")) as f:
            m = json.load(f)["manifests"][0]
        p = {"architecture": parts[1], "os": parts[0]}
        if len(parts) > 2:
            p["variant"] = parts[2]
        entries.append({"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"], "platform": p})
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }, sort_keys=True).encode()
    digest = hashlib.sha256(index).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(index)
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": "sha256:" + digest,
            "size": len(index),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }]}, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print("sha256:" + digest)


if __name__ == "__main__":
    main()
