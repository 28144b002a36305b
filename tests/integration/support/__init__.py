"""Helpers of the real-guest tests: network namespaces with a bridge (netns), a private
libvirtd and sshd (libvirtd), the installer ISO (mini_installer), the one-sector boot CD
(tiny_boot), and the mount-namespace overlays the inner runs use (in_overlay*, run as
scripts by path)."""
