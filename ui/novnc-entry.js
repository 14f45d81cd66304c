// The one entry of the noVNC bundle (see scripts/vendor-ui.sh).
export { default as RFB } from '@novnc/novnc';
