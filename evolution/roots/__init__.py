"""The root models a system grows from (image ViT, text encoder) and their files."""
