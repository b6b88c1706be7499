namespace LoraSharp.Models.StableDiffusion;

/// <summary>What kind of module a prefix rule covers: it decides how the first name after the prefix is renamed.</summary>
public enum LdmModuleKind
{
    /// <summary>Names after the prefix are the same in both layouts (convs, linears, transformers).</summary>
    Plain,
    /// <summary>UNet ResBlock: norm1 ↔ in_layers.0, conv1 ↔ in_layers.2, time_emb_proj ↔ emb_layers.1, norm2 ↔ out_layers.0, conv2 ↔ out_layers.3, conv_shortcut ↔ skip_connection.</summary>
    UNetResnet,
    /// <summary>VAE ResnetBlock: conv_shortcut ↔ nin_shortcut, the rest unchanged.</summary>
    VaeResnet,
    /// <summary>VAE mid attention: group_norm ↔ norm, to_q/to_k/to_v ↔ q/k/v, to_out.0 ↔ proj_out (1×1 convs in ldm).</summary>
    VaeAttention,
}

/// <summary>One module-prefix correspondence, e.g. <c>down_blocks.1.attentions.0.</c> ↔ <c>input_blocks.4.1.</c>.</summary>
public sealed record LdmPrefixRule(string Diffusers, string Ldm, LdmModuleKind Kind);

/// <summary>
/// The ldm/SGM ↔ diffusers naming of a UNet or VAE, built as data from the model's config (block index arithmetic as in
/// diffusers' single-file conversion). Maps module paths and parameter keys both ways, without the file root
/// (<c>model.diffusion_model.</c>, <c>first_stage_model.</c>): e.g. UNet <c>down_blocks.1.resnets.0.conv1.weight</c>
/// ↔ <c>input_blocks.4.0.in_layers.2.weight</c>.
/// </summary>
public sealed class LdmKeyMap
{
    static readonly (string Diffusers, string Ldm)[] UNetResnetNames =
    [
        ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
    ];
    static readonly (string Diffusers, string Ldm)[] VaeResnetNames = [("conv_shortcut", "nin_shortcut")];
    static readonly (string Diffusers, string Ldm)[] VaeAttentionNames =
        [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")];

    /// <summary>The rules, most specific first.</summary>
    public IReadOnlyList<LdmPrefixRule> Rules { get; }

    LdmKeyMap(IEnumerable<LdmPrefixRule> rules) =>
        Rules = rules.OrderByDescending(r => Math.Max(r.Diffusers.Length, r.Ldm.Length)).ToArray();

    /// <summary>The UNet map: time_embed ↔ time_embedding, label_emb.0 ↔ add_embedding, input_blocks ↔ conv_in/down_blocks,
    /// middle_block ↔ mid_block, output_blocks ↔ up_blocks, out ↔ conv_norm_out/conv_out.</summary>
    public static LdmKeyMap ForUNet(UNetConfig c)
    {
        var rules = new List<LdmPrefixRule>
        {
            new("time_embedding.linear_1.", "time_embed.0.", LdmModuleKind.Plain),
            new("time_embedding.linear_2.", "time_embed.2.", LdmModuleKind.Plain),
            new("add_embedding.linear_1.", "label_emb.0.0.", LdmModuleKind.Plain),
            new("add_embedding.linear_2.", "label_emb.0.2.", LdmModuleKind.Plain),
            new("conv_in.", "input_blocks.0.0.", LdmModuleKind.Plain),
            new("conv_norm_out.", "out.0.", LdmModuleKind.Plain),
            new("conv_out.", "out.2.", LdmModuleKind.Plain),
            new("mid_block.resnets.0.", "middle_block.0.", LdmModuleKind.UNetResnet),
            new("mid_block.attentions.0.", "middle_block.1.", LdmModuleKind.Plain),
            new("mid_block.resnets.1.", "middle_block.2.", LdmModuleKind.UNetResnet),
        };
        int n = c.BlockOutChannels.Length;
        int input = 1;
        for (int i = 0; i < n; i++)
        {
            bool attn = c.DownBlockTypes[i] == "CrossAttnDownBlock2D";
            for (int j = 0; j < c.LayersPerBlock[i]; j++, input++)
            {
                rules.Add(new($"down_blocks.{i}.resnets.{j}.", $"input_blocks.{input}.0.", LdmModuleKind.UNetResnet));
                if (attn) rules.Add(new($"down_blocks.{i}.attentions.{j}.", $"input_blocks.{input}.1.", LdmModuleKind.Plain));
            }
            if (i < n - 1)
            {
                rules.Add(new($"down_blocks.{i}.downsamplers.0.conv.", $"input_blocks.{input}.0.op.", LdmModuleKind.Plain));
                input++;
            }
        }
        int output = 0;
        for (int i = 0; i < n; i++)
        {
            bool attn = c.UpBlockTypes[i] == "CrossAttnUpBlock2D";
            int layers = c.LayersPerBlock[n - 1 - i] + 1;
            for (int j = 0; j < layers; j++, output++)
            {
                rules.Add(new($"up_blocks.{i}.resnets.{j}.", $"output_blocks.{output}.0.", LdmModuleKind.UNetResnet));
                if (attn) rules.Add(new($"up_blocks.{i}.attentions.{j}.", $"output_blocks.{output}.1.", LdmModuleKind.Plain));
                if (j == layers - 1 && i < n - 1)
                    rules.Add(new($"up_blocks.{i}.upsamplers.0.conv.", $"output_blocks.{output}.{(attn ? 2 : 1)}.conv.", LdmModuleKind.Plain));
            }
        }
        return new LdmKeyMap(rules);
    }

    /// <summary>The VAE map: encoder.down.i.block.j ↔ encoder.down_blocks.i.resnets.j, mid.block_1/attn_1/block_2 ↔
    /// mid_block.resnets.0/attentions.0/resnets.1, norm_out ↔ conv_norm_out, decoder.up.(n−1−i) ↔ decoder.up_blocks.i.</summary>
    public static LdmKeyMap ForVae(VaeConfig c)
    {
        var rules = new List<LdmPrefixRule>
        {
            new("quant_conv.", "quant_conv.", LdmModuleKind.Plain),
            new("post_quant_conv.", "post_quant_conv.", LdmModuleKind.Plain),
        };
        int n = c.BlockOutChannels.Length;
        foreach (var part in new[] { "encoder", "decoder" })
        {
            rules.Add(new($"{part}.conv_in.", $"{part}.conv_in.", LdmModuleKind.Plain));
            rules.Add(new($"{part}.conv_out.", $"{part}.conv_out.", LdmModuleKind.Plain));
            rules.Add(new($"{part}.conv_norm_out.", $"{part}.norm_out.", LdmModuleKind.Plain));
            rules.Add(new($"{part}.mid_block.resnets.0.", $"{part}.mid.block_1.", LdmModuleKind.VaeResnet));
            rules.Add(new($"{part}.mid_block.resnets.1.", $"{part}.mid.block_2.", LdmModuleKind.VaeResnet));
            rules.Add(new($"{part}.mid_block.attentions.0.", $"{part}.mid.attn_1.", LdmModuleKind.VaeAttention));
        }
        for (int i = 0; i < n; i++)
        {
            for (int j = 0; j < c.LayersPerBlock; j++)
                rules.Add(new($"encoder.down_blocks.{i}.resnets.{j}.", $"encoder.down.{i}.block.{j}.", LdmModuleKind.VaeResnet));
            if (i < n - 1)
                rules.Add(new($"encoder.down_blocks.{i}.downsamplers.0.conv.", $"encoder.down.{i}.downsample.conv.", LdmModuleKind.Plain));
            int up = n - 1 - i;
            for (int j = 0; j < c.LayersPerBlock + 1; j++)
                rules.Add(new($"decoder.up_blocks.{i}.resnets.{j}.", $"decoder.up.{up}.block.{j}.", LdmModuleKind.VaeResnet));
            if (i < n - 1)
                rules.Add(new($"decoder.up_blocks.{i}.upsamplers.0.conv.", $"decoder.up.{up}.upsample.conv.", LdmModuleKind.Plain));
        }
        return new LdmKeyMap(rules);
    }

    /// <summary>diffusers module path or parameter key → ldm; null when no rule covers it.</summary>
    public string? ToLdm(string diffusersKey) => Translate(diffusersKey, toLdm: true);

    /// <summary>ldm module path or parameter key → diffusers; null when no rule covers it.</summary>
    public string? ToDiffusers(string ldmKey) => Translate(ldmKey, toLdm: false);

    /// <summary>The rule covering a diffusers key (null if none).</summary>
    public LdmPrefixRule? RuleFor(string diffusersKey) =>
        Rules.FirstOrDefault(r => Covers(diffusersKey, r.Diffusers));

    string? Translate(string key, bool toLdm)
    {
        foreach (var rule in Rules)
        {
            var from = toLdm ? rule.Diffusers : rule.Ldm;
            if (!Covers(key, from)) continue;
            var to = toLdm ? rule.Ldm : rule.Diffusers;
            if (key.Length < from.Length) return to[..^1]; // the module path itself
            var rest = key[from.Length..];
            var names = rule.Kind switch
            {
                LdmModuleKind.UNetResnet => UNetResnetNames,
                LdmModuleKind.VaeResnet => VaeResnetNames,
                LdmModuleKind.VaeAttention => VaeAttentionNames,
                _ => [],
            };
            foreach (var (d, l) in names)
            {
                var (a, b) = toLdm ? (d, l) : (l, d);
                if (rest == a || rest.StartsWith(a + ".", StringComparison.Ordinal))
                    return to + b + rest[a.Length..];
            }
            return to + rest;
        }
        return null;
    }

    /// <summary>True when <paramref name="key"/> starts with the prefix (ending in '.') or equals it without the dot.</summary>
    static bool Covers(string key, string prefix) =>
        key.StartsWith(prefix, StringComparison.Ordinal) || key == prefix[..^1];

    /// <summary>Parameter mappings for a UNet/VAE module from a single file whose component root is <paramref name="root"/>.
    /// VAE attention Linear weights are stored as 1×1 convs; transformer proj_in/proj_out may be either (reshaped).</summary>
    public IReadOnlyList<KeyMapping> Mappings(IEnumerable<string> parameterKeys, string root, Func<string, string>? sourceKeyOf = null)
    {
        var list = new List<KeyMapping>();
        foreach (var key in parameterKeys)
        {
            var ldm = ToLdm(key);
            if (ldm is null) continue;
            var source = root + ldm;
            if (sourceKeyOf is not null) source = sourceKeyOf(source);
            var rule = RuleFor(key)!;
            bool weight = key.EndsWith(".weight", StringComparison.Ordinal);
            var transform = !weight ? TensorTransform.None
                : rule.Kind == LdmModuleKind.VaeAttention && !key.Contains("group_norm", StringComparison.Ordinal) ? TensorTransform.LinearAsConv1x1
                : key.EndsWith("proj_in.weight", StringComparison.Ordinal) || key.EndsWith("proj_out.weight", StringComparison.Ordinal) ? TensorTransform.Reshape
                : TensorTransform.None;
            list.Add(new KeyMapping(key, source, transform));
        }
        return list;
    }
}

/// <summary>Text encoder layouts in single files: Hugging Face CLIP names under a root, or OpenCLIP names (fused q/k/v).</summary>
public static class ClipKeyMap
{
    /// <summary>HF-named encoder stored under <paramref name="root"/> (<c>cond_stage_model.transformer.</c>,
    /// <c>conditioner.embedders.0.transformer.</c>).</summary>
    public static IReadOnlyList<KeyMapping> HuggingFace(IEnumerable<string> parameterKeys, string root) =>
        parameterKeys.Select(k => new KeyMapping(k, root + k)).ToArray();

    /// <summary>
    /// OpenCLIP text tower under <paramref name="root"/> (<c>cond_stage_model.model.</c>, <c>conditioner.embedders.1.model.</c>):
    /// token_embedding, positional_embedding, transformer.resblocks.i.{ln_1, attn.in_proj_* (q/k/v row blocks), attn.out_proj,
    /// ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection ([hidden, proj], transposed).
    /// </summary>
    public static IReadOnlyList<KeyMapping> OpenClip(ClipTextConfig c, string root)
    {
        var list = new List<KeyMapping>
        {
            new("text_model.embeddings.token_embedding.weight", root + "token_embedding.weight"),
            new("text_model.embeddings.position_embedding.weight", root + "positional_embedding"),
            new("text_model.final_layer_norm.weight", root + "ln_final.weight"),
            new("text_model.final_layer_norm.bias", root + "ln_final.bias"),
        };
        if (c.ProjectionDim is not null)
            list.Add(new("text_projection.weight", root + "text_projection", TensorTransform.Transpose));
        for (int i = 0; i < c.NumHiddenLayers; i++)
        {
            string t = $"text_model.encoder.layers.{i}.", s = $"{root}transformer.resblocks.{i}.";
            string[] qkv = ["q_proj", "k_proj", "v_proj"];
            for (int part = 0; part < 3; part++)
            {
                list.Add(new($"{t}self_attn.{qkv[part]}.weight", s + "attn.in_proj_weight", TensorTransform.FusedQkvChunk, part));
                list.Add(new($"{t}self_attn.{qkv[part]}.bias", s + "attn.in_proj_bias", TensorTransform.FusedQkvChunk, part));
            }
            foreach (var (hf, oc) in new[] { ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj") })
            {
                list.Add(new($"{t}{hf}.weight", $"{s}{oc}.weight"));
                list.Add(new($"{t}{hf}.bias", $"{s}{oc}.bias"));
            }
        }
        return list;
    }
}
