"""genserve inside other serving systems: ``ray_serve`` (replicas behind Ray Serve, the
``genserve[ray]`` extra). Nothing here is imported by the server itself."""
