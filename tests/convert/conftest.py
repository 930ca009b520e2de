from tests.registry.helpers import busybox_images, registry  # noqa: F401  (fixtures)
