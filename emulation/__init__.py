"""How a device and its link are made real on a host: profiles, backends, probing, cleanup."""
