"""pyvmm-virtiofsd: a vhost-user virtio-fs back-end in Python that does DAX.

* ``iovec``: guest buffers as one byte stream (RAM views and foreign ranges);
* ``fuse_abi``: the FUSE wire structures of <linux/fuse.h> as ctypes;
* ``passthrough``: the host file system behind the share (O_PATH inodes);
* ``server``: FUSE request dispatch over virtio (no /dev/fuse);
* ``vhost``: the vhost-user back-end side: memory table, vrings, DAX requests;
* ``sandbox``: namespace / chroot confinement;
* ``cli``: the ``pyvmm-virtiofsd`` command.
"""
