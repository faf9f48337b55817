//! virtio devices over PCI and vhost-user.
