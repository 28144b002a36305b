"""pytest-kvm: disposable KVM/QEMU guests for pytest."""

__version__ = "0.1.0"
