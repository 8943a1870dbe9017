"""The MONAI Label server side of the app: what runs in ``monailabel start_server``.

``app`` (the mixin the app class in ``apps/spine/main.py`` is built from), ``http`` (the one
place where HTTP behaviour is wired into MONAI Label: middleware, routes, token check),
``datastore`` (the checked local studies folder), ``dicomweb`` (PACS studies), ``auth``
(tokens and roles), ``admin`` (model version routes and the version watcher).
"""
