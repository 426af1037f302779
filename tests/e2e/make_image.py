#!/usr/bin/env python3
"""Writes an OCI image layout with real gzipped tar layers of pseudo-random bytes.

usage: make_image.py DIR TAG LAYERS SIZE_KIB SEED [--busybox=PATH] [--platform=OS/ARCH[/VARIANT]]

Deterministic for a given SEED, so two scenarios that want the same layers get the same
digests, and different seeds give different images.

With --busybox=PATH (a static busybox, Debian's busybox-static) the first layer is a
runnable root file system instead: bin/busybox with bin/true and bin/sh linking to it (and
a file naming the seed, so each seed's layer differs), the image's command /bin/true. A
runtime that runs the image then proves that layer arrived intact.
With --platform the config names that platform (default linux/amd64); make_index.py puts
such images into one multi-platform index.
"""
import gzip
import hashlib
import io
import json
import os
import random
import struct
import sys
import tarfile


def blob(root, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(root, "blobs", "sha256", digest)
    with open(path, "wb") as f:
        f.write(data)
    return "sha256:" + digest, len(data)


def is_static_elf(data):
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def add_file(tar, name, content, mode=0o644):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(content))


def busybox_tar(tar, busybox, seed):
    with open(busybox, "rb") as f:
        binary = f.read()
    if not is_static_elf(binary):
        sys.exit(f"{busybox} is not a static 64-bit ELF executable (install busybox-static)")
    for d in ("bin", "etc"):
        info = tarfile.TarInfo(d)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(info)
    add_file(tar, "bin/busybox", binary, 0o755)
    for link in ("true", "sh"):
        info = tarfile.TarInfo(f"bin/{link}")
        info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", 0
        tar.addfile(info)
    add_file(tar, "etc/e2e-image", f"seed {seed}\n".encode())


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    platform = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--platform=")), "linux/amd64").split("/")
    busybox = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--busybox=")), None)
    root, tag, layers, size_kib, seed = args[0], args[1], int(args[2]), int(args[3]), int(args[4])
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    rng = random.Random(seed)
    layer_descs, diff_ids = [], []
    for i in range(layers):
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            if busybox and i == 0:
                busybox_tar(tar, busybox, seed)
            else:
                add_file(tar, f"layer{i}/data.bin", rng.randbytes(size_kib * 1024))
        tar_bytes = tar_buf.getvalue()
        diff_ids.append("sha256:" + hashlib.sha256(tar_bytes).hexdigest())
        gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
        digest, size = blob(root, gz)
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size})
    config = {
        "architecture": platform[1],
        "os": platform[0],
        **({"variant": platform[2]} if len(platform) > 2 else {}),
        "config": {"Cmd": ["/bin/true"] if busybox else ["/layer0/data.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cdigest, csize = blob(root, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest, "size": csize},
        "layers": layer_descs,
    }
    mdigest, msize = blob(root, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": msize,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    print(mdigest)


if __name__ == "__main__":
    main()
