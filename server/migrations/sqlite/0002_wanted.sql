-- Content a site wants: recorded when an agent of the site asks for sources of a content
-- its site's RVP does not fully hold. The RVP learns it from POST /v1/assignments and
-- fetches for the site; the row goes once the RVP holds the content whole.
CREATE TABLE wanted (
    site_id TEXT NOT NULL,
    content_id TEXT NOT NULL,
    wanted_ms BIGINT NOT NULL,
    PRIMARY KEY (site_id, content_id)
);
