-- Later requests that name a context id a2ad made are sent with the agent's.
CREATE INDEX items_context ON items (context_id) WHERE agent_context_id IS NOT NULL;
