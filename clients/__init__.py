"""The Flower ClientApp: a hospital's private shard, vision tower, connector and the
client half of the compressor."""
