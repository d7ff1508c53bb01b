"""varq's Hydra configs (YAML), inside the package so that an installed wheel finds them (``pkg://varq.conf``)."""
