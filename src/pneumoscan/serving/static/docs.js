"use strict";
// The API docs, served from this package: Swagger UI reads the service's own OpenAPI schema.
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui" });
