"""Payload formats: decoders and encoders shared by every broker source and target."""
