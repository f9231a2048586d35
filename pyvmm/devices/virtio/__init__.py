"""virtio 1.x devices and their PCI transport (virtio spec v1.2)."""
