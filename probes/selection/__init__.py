"""What gets deployed: the layer x position sweep (`sweep`), the transfer candidate search (`candidates`)
and the abstention threshold (`thresholds`)."""
