"""Flashing devices: one self-contained, offline-installable archive per device class.

``build`` (``fedlora-edge bundle``, on a build host; no torch needed) writes a tar.gz holding
everything a device needs and nothing it has to download::

    fedlora-edge-bundle/
      BUNDLE-MANIFEST.json    sha256 and size of every file below; target, rank, versions
      install.sh              offline install into PREFIX: venv, artifacts, config, systemd unit
      uninstall.sh
      requirements.txt        every wheel of wheelhouse/ pinned with its sha256 (--require-hashes)
      wheelhouse/             the client wheel + the runtime wheels it declares for the
                              target platform and Python (with --full, their declared
                              dependencies too), + pip (run from its wheel)
      artifacts/              the ORT training artifacts of one rank (hashed by manifest.json)
      config/device.json      the device config, its paths pointing into the install
      config/credentials.env  broker credentials (mode 600), or a placeholder to provision
      config/credentials/     TLS files the config or the credentials name
      fedlora-edge.service    systemd unit (hardened; MemoryMax from the memory budget)
      README.txt

``install`` is what the bundle's ``install.sh`` runs on the device (``verify``,
``install-files``); it uses the standard library only. ``layout`` holds what both sides agree
on: file names, the manifest's format version, the credentials.env format. ``templates/`` holds
install.sh, uninstall.sh and the unit, filled in by ``build``.
"""
