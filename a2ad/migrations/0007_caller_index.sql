-- ListTasks pages through one caller's items of one workspace, most recently
-- updated first; without this it reads every item of the workspace to sort them.
CREATE INDEX items_caller ON items (workspace, caller, updated_at);
