// Maps a click on a grid image to its channel (same formula as the manifest:
// row c // cols, col c % cols, tiles tile + separator apart) and shows the tile
// of that channel, from one grid or from every grid of a gallery row, enlarged.
(function(){
// Images are linked by data-src, set here: a link from `actviz open` carries, after
// '#actviz-signed=', the presigned query of every object the page refers to
// (producer/signed.py), applied before anything loads; otherwise the key as it is.
(function images(){
  const m=/[#&]actviz-signed=([^&]*)/.exec(location.hash);let v=null;
  if(m){try{v=JSON.parse(decodeURIComponent(m[1]));}catch(e){v=null;}}
  const own=ref=>v!==null&&Object.prototype.hasOwnProperty.call(v.s,ref);
  const signed=ref=>{
    if(!own(ref))return ref;
    const u=new URL(ref,location.href);u.hash='';u.search=[v.q,v.s[ref]].filter(Boolean).join('&');
    return u.href;
  };
  document.querySelectorAll('img[data-src]').forEach(img=>img.setAttribute('src',signed(img.dataset.src)));
  document.querySelectorAll('a[href]').forEach(a=>{const r=a.getAttribute('href');if(own(r))a.setAttribute('href',signed(r));});
})();
const DATA=JSON.parse(document.getElementById('actviz-data').textContent);
const box=document.getElementById('lightbox');
const fmt=v=>(v===null||v===undefined)?'–':Number(v).toPrecision(4).replace(/\.?0+$/,'');
function items(layer){return DATA.rows?DATA.rows[layer]:[DATA.layers[layer]];}
function gridImg(layer,i){return document.querySelector('img.grid[data-layer="'+layer+'"][data-item="'+i+'"]');}
function sprite(el,src,g,c,size){
  const row=Math.floor(c/g.cols),col=c%g.cols,s=size/Math.max(g.tile_w,g.tile_h);
  el.style.width=(g.tile_w*s)+'px';el.style.height=(g.tile_h*s)+'px';
  el.style.backgroundImage='url("'+src+'")';
  el.style.backgroundSize=(g.width*s)+'px '+(g.height*s)+'px';
  el.style.backgroundPosition=(-col*(g.tile_w+g.separator)*s)+'px '+(-row*(g.tile_h+g.separator)*s)+'px';
}
function show(layer,c){
  const host=document.getElementById('lb-tiles');host.replaceChildren();
  let title=null;
  items(layer).forEach((it,i)=>{
    const img=gridImg(layer,i);
    if(!it||!it.geometry||!img||c>=it.geometry.channels)return;
    title=title||it.name+' · channel '+c;
    const fig=document.createElement('figure'),tile=document.createElement('div');
    tile.className='tile';sprite(tile,img.src,it.geometry,c,DATA.rows?220:360);fig.appendChild(tile);
    const cap=document.createElement('figcaption');
    if(it.label){cap.textContent=it.label;}
    fig.appendChild(cap);
    const t=document.createElement('table');t.className='lbstats';
    for(const k of ['mean','std','min','max','sparsity']){
      const r=t.insertRow();r.insertCell().textContent=k;r.insertCell().textContent=fmt((it.stats[k]||[])[c]);}
    const r=t.insertRow();r.insertCell().textContent='dead';
    r.insertCell().textContent=(it.dead||[]).includes(c)?'yes':'no';
    fig.appendChild(t);host.appendChild(fig);
  });
  if(title===null)return;
  document.getElementById('lb-title').textContent=title;
  box.hidden=false;box.dataset.layer=layer;box.dataset.channel=c;
}
document.querySelectorAll('img.grid').forEach(img=>{
  img.addEventListener('click',ev=>{
    const layer=+img.dataset.layer,item=items(layer)[+img.dataset.item];
    if(!item||!item.geometry)return;
    const g=item.geometry,r=img.getBoundingClientRect();
    const x=(ev.clientX-r.left)*g.width/r.width,y=(ev.clientY-r.top)*g.height/r.height;
    const col=Math.floor(x/(g.tile_w+g.separator)),row=Math.floor(y/(g.tile_h+g.separator));
    if(col<0||col>=g.cols||row<0)return;
    const c=row*g.cols+col;if(c<g.channels)show(layer,c);
  });
});
// A job page outlines each layer's dead channels on their tiles (up to a limit; the
// text beside the grid lists them all).
if(!DATA.rows)DATA.layers.forEach((it,layer)=>{
  const img=gridImg(layer,0),g=it&&it.geometry,dead=(it&&it.dead)||[];
  if(!img||!g||dead.length>DATA.dead_mark_limit)return;
  const pct=(v,whole)=>(100*v/whole).toFixed(3)+'%';
  dead.forEach(c=>{
    if(c>=g.channels)return;
    const row=Math.floor(c/g.cols),col=c%g.cols,m=document.createElement('span');
    m.className='deadmark';m.title='channel '+c+' is dead';
    m.style.left=pct(col*(g.tile_w+g.separator),g.width);m.style.top=pct(row*(g.tile_h+g.separator),g.height);
    m.style.width=pct(g.tile_w,g.width);m.style.height=pct(g.tile_h,g.height);
    img.parentNode.appendChild(m);
  });
});
document.querySelectorAll('button.tile').forEach(b=>{
  const img=gridImg(b.dataset.layer,0);
  if(img)b.style.backgroundImage='url("'+img.src+'")';
  b.addEventListener('click',()=>show(+b.dataset.layer,+b.dataset.channel));
});
box.addEventListener('click',ev=>{if(ev.target===box||ev.target.classList.contains('close'))box.hidden=true;});
document.addEventListener('keydown',ev=>{if(ev.key==='Escape')box.hidden=true;});
// Images fail from a link that signs this page alone (a private bucket): say why.
const note=document.getElementById('linknote');
const broken=()=>{note.hidden=false;};
document.querySelectorAll('img').forEach(img=>{
  if(img.complete&&img.naturalWidth===0)broken();else img.addEventListener('error',broken);
});
})();
