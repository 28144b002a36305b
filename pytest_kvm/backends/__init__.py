"""Backends run guests: ``qemu`` directly (default) or through libvirt."""
