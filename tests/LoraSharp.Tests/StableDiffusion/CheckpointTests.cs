using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

public class CheckpointTests
{
    static bool Same(Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();

    public static TheoryData<string> SetNames() => new(SdReference.Sets);

    public static TheoryData<string, StableDiffusionFamily> SetFamilies()
    {
        var data = new TheoryData<string, StableDiffusionFamily>();
        foreach (var set in SdReference.Sets)
            data.Add(set, SdReference.Manifest(set).GetProperty("family").GetString() switch
            {
                "sd15" or "sd1" => StableDiffusionFamily.SD1,
                "sd2" => StableDiffusionFamily.SD2,
                "sdxl" => StableDiffusionFamily.SDXLBase,
                var f => throw new InvalidOperationException($"unknown manifest family {f}"),
            });
        return data;
    }

    [Theory]
    [MemberData(nameof(SetFamilies))]
    public void Family_is_detected_from_the_single_file_and_the_diffusers_folder(string set, StableDiffusionFamily family)
    {
        using var source = StableDiffusionCheckpoint.Open(SdReference.SingleFile(set));
        Assert.Equal(family, StableDiffusionCheckpoint.DetectFamily(source));
        Assert.Equal(family, StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set)).Family);
    }

    [Fact]
    public void A_file_that_is_not_a_checkpoint_is_unknown_and_refused_by_name()
    {
        var path = SdReference.PathOf("sd", "lora/kohya_lora.safetensors");
        using var source = StableDiffusionCheckpoint.Open(path);
        Assert.Equal(StableDiffusionFamily.Unknown, StableDiffusionCheckpoint.DetectFamily(source));
        var e = Assert.Throws<LoraSharpException>(() => StableDiffusionCheckpoint.DeriveConfig(source));
        Assert.Equal(Path.GetFullPath(path), e.FilePath);
        Assert.Contains("not a Stable Diffusion single-file checkpoint", e.Message);
        Assert.Contains("Family: unknown", StableDiffusionCheckpoint.Describe(source));
        Assert.Throws<LoraSharpException>(() => StableDiffusionModel.Load(path));
    }

    /// <summary>Removing any one tensor from a checkpoint: deriving its config still works or fails with a
    /// LoraSharpException naming the file, never with an unrelated exception.</summary>
    [Theory]
    [MemberData(nameof(SetNames))]
    public void Deriving_a_config_from_a_file_missing_any_one_tensor_fails_cleanly_or_succeeds(string set)
    {
        using var source = StableDiffusionCheckpoint.Open(SdReference.SingleFile(set));
        int failures = 0;
        foreach (var removed in source.Keys)
        {
            using var view = new WithoutKey(source, removed);
            try
            {
                var config = StableDiffusionCheckpoint.DeriveConfig(view);
                Assert.NotEmpty(config.Unet.BlockOutChannels);
            }
            catch (LoraSharpException e)
            {
                Assert.Equal(source.FilePath, e.FilePath);
                failures++;
            }
        }
        Assert.InRange(failures, 1, source.Keys.Count - 1);
    }

    sealed class WithoutKey(ITensorSource inner, string removed) : ITensorSource
    {
        public string FilePath => inner.FilePath;
        public IReadOnlyList<string> Keys { get; } = inner.Keys.Where(k => k != removed).ToArray();
        public IReadOnlyDictionary<string, string> Metadata => inner.Metadata;
        public TensorInfo Info(string key) => key == removed ? throw new LoraSharpException("no such tensor", FilePath, key) : inner.Info(key);
        public bool Contains(string key) => key != removed && inner.Contains(key);
        public Tensor Load(string key, ScalarType? dtype = null, Device? device = null) => inner.Load(key, dtype, device);
        public void Dispose() { }
    }

    [Fact]
    public void Ckpt_copy_is_read_without_its_state_dict_level_and_detected_as_sd1()
    {
        using var source = StableDiffusionCheckpoint.Open(SdReference.Ckpt("sd"));
        Assert.Contains("model.diffusion_model.input_blocks.0.0.weight", source.Keys);
        Assert.Equal(StableDiffusionFamily.SD1, StableDiffusionCheckpoint.DetectFamily(source));
    }

    [Theory]
    [MemberData(nameof(SetNames))]
    public void Config_derived_from_shapes_equals_the_diffusers_config_except_heads_and_groups(string set)
    {
        var folder = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set));
        using var source = StableDiffusionCheckpoint.Open(SdReference.SingleFile(set));
        var derived = StableDiffusionCheckpoint.DeriveConfig(source);
        Assert.Equal(folder.Family, derived.Family);
        var (a, b) = (folder.Unet, derived.Unet);
        Assert.Equal(a.InChannels, b.InChannels);
        Assert.Equal(a.OutChannels, b.OutChannels);
        Assert.Equal(a.BlockOutChannels, b.BlockOutChannels);
        Assert.Equal(a.DownBlockTypes, b.DownBlockTypes);
        Assert.Equal(a.UpBlockTypes, b.UpBlockTypes);
        Assert.Equal(a.LayersPerBlock, b.LayersPerBlock);
        Assert.Equal(a.TransformerLayersPerBlock, b.TransformerLayersPerBlock);
        Assert.Equal(a.CrossAttentionDim, b.CrossAttentionDim);
        Assert.Equal(a.UseLinearProjection, b.UseLinearProjection);
        Assert.Equal(a.AdditionEmbedType, b.AdditionEmbedType);
        Assert.Equal(a.AdditionTimeEmbedDim, b.AdditionTimeEmbedDim);
        Assert.Equal(a.ProjectionClassEmbeddingsInputDim, b.ProjectionClassEmbeddingsInputDim);
        Assert.Equal(folder.Vae!.BlockOutChannels, derived.Vae!.BlockOutChannels);
        Assert.Equal(folder.Vae.LayersPerBlock, derived.Vae.LayersPerBlock);
        Assert.Equal(folder.Vae.LatentChannels, derived.Vae.LatentChannels);
        Assert.Equal(folder.Vae.ScalingFactor, derived.Vae.ScalingFactor);
        foreach (var (x, y) in new[] { (folder.TextEncoder, derived.TextEncoder), (folder.TextEncoder2, derived.TextEncoder2) })
        {
            Assert.Equal(x is null, y is null);
            if (x is null || y is null) continue;
            Assert.Equal(x with { NumAttentionHeads = 0 }, y with { NumAttentionHeads = 0 });
        }
    }

    [Theory]
    [MemberData(nameof(SetNames))]
    public void Every_unet_and_vae_key_maps_to_the_single_file_and_back(string set)
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set));
        using var source = StableDiffusionCheckpoint.Open(SdReference.SingleFile(set));
        using var unet = new UNet2DConditionModel(config.Unet);
        using var vae = new AutoencoderKL(config.Vae!);
        foreach (var (module, map, root) in new[] { ((nn.Module)unet, LdmKeyMap.ForUNet(config.Unet), StableDiffusionCheckpoint.UNetRoot), (vae, LdmKeyMap.ForVae(config.Vae!), StableDiffusionCheckpoint.VaeRoot) })
        {
            var keys = WeightCopy.StateKeys(module);
            var ldmKeys = new HashSet<string>();
            foreach (var key in keys)
            {
                var ldm = map.ToLdm(key);
                Assert.NotNull(ldm);
                Assert.True(source.Contains(root + ldm), $"{key} → {root}{ldm} is not in the file");
                Assert.Equal(key, map.ToDiffusers(ldm!));
                ldmKeys.Add(root + ldm);
            }
            var fileKeys = source.Keys.Where(k => k.StartsWith(root, StringComparison.Ordinal)).ToHashSet();
            Assert.Empty(fileKeys.Except(ldmKeys).Order());
        }
    }

    static UNetConfig RealSd15Unet => new()
    {
        BlockOutChannels = [320, 640, 1280, 1280],
        DownBlockTypes = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        UpBlockTypes = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        LayersPerBlock = [2, 2, 2, 2], TransformerLayersPerBlock = [1, 1, 1, 1], AttentionHeads = [8, 8, 8, 8], CrossAttentionDim = 768,
    };

    static UNetConfig RealSdxlUnet => new()
    {
        BlockOutChannels = [320, 640, 1280],
        DownBlockTypes = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        UpBlockTypes = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        LayersPerBlock = [2, 2, 2], TransformerLayersPerBlock = [1, 2, 10], AttentionHeads = [5, 10, 20], CrossAttentionDim = 2048,
        UseLinearProjection = true, AdditionEmbedType = "text_time", AdditionTimeEmbedDim = 256, ProjectionClassEmbeddingsInputDim = 2816,
    };

    /// <summary>Known correspondences of the real SD1.5 and SDXL layouts (diffusers' single-file conversion tables).</summary>
    [Fact]
    public void Module_paths_map_between_sgm_and_diffusers_names()
    {
        var sdxl = LdmKeyMap.ForUNet(RealSdxlUnet);
        Assert.Equal("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", sdxl.ToDiffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q"));
        Assert.Equal("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", sdxl.ToDiffusers("input_blocks.8.1.transformer_blocks.9.ff.net.2"));
        Assert.Equal("input_blocks.6.0.op", sdxl.ToLdm("down_blocks.1.downsamplers.0.conv"));
        Assert.Equal("output_blocks.2.2.conv", sdxl.ToLdm("up_blocks.0.upsamplers.0.conv"));
        Assert.Equal("output_blocks.5.2.conv", sdxl.ToLdm("up_blocks.1.upsamplers.0.conv"));
        Assert.Equal("up_blocks.2.resnets.2.conv_shortcut", sdxl.ToDiffusers("output_blocks.8.0.skip_connection"));
        Assert.Equal("label_emb.0.0", sdxl.ToLdm("add_embedding.linear_1"));
        Assert.Equal("middle_block.2.skip_connection", sdxl.ToLdm("mid_block.resnets.1.conv_shortcut"));
        var sd = LdmKeyMap.ForUNet(RealSd15Unet);
        Assert.Equal("up_blocks.1.resnets.2.conv1.weight", sd.ToDiffusers("output_blocks.5.0.in_layers.2.weight"));
        Assert.Equal("output_blocks.5.2.conv", sd.ToLdm("up_blocks.1.upsamplers.0.conv"));
        Assert.Equal("output_blocks.2.1.conv", sd.ToLdm("up_blocks.0.upsamplers.0.conv"));
        Assert.Equal("output_blocks.8.2.conv", sd.ToLdm("up_blocks.2.upsamplers.0.conv"));
        Assert.Equal("up_blocks.3.attentions.2.proj_out", sd.ToDiffusers("output_blocks.11.1.proj_out"));
        Assert.Equal("input_blocks.7.0.emb_layers.1", sd.ToLdm("down_blocks.2.resnets.0.time_emb_proj"));
        Assert.Equal("input_blocks.9.0.op", sd.ToLdm("down_blocks.2.downsamplers.0.conv"));
        Assert.Equal("down_blocks.3.resnets.1.conv2", sd.ToDiffusers("input_blocks.11.0.out_layers.3"));
        var vae = LdmKeyMap.ForVae(new VaeConfig());
        Assert.Equal("decoder.up.3.block.0.nin_shortcut.weight", vae.ToLdm("decoder.up_blocks.0.resnets.0.conv_shortcut.weight"));
        Assert.Equal("decoder.up_blocks.2.upsamplers.0.conv", vae.ToDiffusers("decoder.up.1.upsample.conv"));
        Assert.Null(vae.ToDiffusers("decoder.up.0.upsample.conv")); // the last decoder level has no upsampler
        Assert.Equal("encoder.mid_block.attentions.0.to_out.0", vae.ToDiffusers("encoder.mid.attn_1.proj_out"));
        Assert.Equal("encoder.down_blocks.3.resnets.1.norm2", vae.ToDiffusers("encoder.down.3.block.1.norm2"));
        Assert.Null(sd.ToLdm("not_a_module.weight"));
    }

    [Theory]
    [MemberData(nameof(SetNames))]
    public void Loading_reports_every_key_loaded_none_unexpected_and_position_ids_ignored(string set)
    {
        var model = SdReference.Model(set, "single_file");
        var file = model.LoadReports.Single(r => r.Component == "file");
        Assert.Empty(file.Unexpected);
        Assert.Contains(file.Ignored, k => k.EndsWith("embeddings.position_ids", StringComparison.Ordinal));
        foreach (var r in model.LoadReports.Where(r => r.Component != "file"))
        {
            Assert.True(r.IsComplete, r.ToString());
            Assert.True(r.Loaded > 0);
        }
        var diffusers = SdReference.Model(set, "diffusers");
        // Models are built on the meta device and every parameter is replaced by its loaded tensor.
        foreach (var m in new[] { model, diffusers })
            Assert.All(m.named_parameters(), p => Assert.True(p.parameter.device.type == DeviceType.CPU && p.parameter.requires_grad, p.name));
        Assert.All(diffusers.LoadReports, r => Assert.True(r.IsComplete && r.Unexpected.Count == 0, r.ToString()));
        Assert.Equal(model.LoadReports.Where(r => r.Component != "file").Sum(r => r.Loaded), diffusers.LoadReports.Sum(r => r.Loaded));
    }

    /// <summary>Save is the exact inverse of loading, and writes what diffusers' conversion scripts write.</summary>
    [Theory]
    [MemberData(nameof(SetNames))]
    public void Saved_single_file_equals_the_reference_single_file_bitwise(string set)
    {
        using var tmp = new TempDir();
        var model = SdReference.Model(set, "diffusers");
        var path = tmp.File("saved.safetensors");
        StableDiffusionCheckpoint.Save(model, path);
        using var saved = SafetensorsFile.Open(path);
        using var reference = SafetensorsFile.Open(SdReference.SingleFile(set));
        var expectedKeys = reference.Keys.Where(k => !StableDiffusionModel.IsIgnorable(k)).Order().ToArray();
        Assert.Equal(expectedKeys, saved.Keys.Order().ToArray());
        using var scope = NewDisposeScope();
        foreach (var key in expectedKeys)
        {
            var a = reference.Load(key, ScalarType.Float32);
            var b = saved.Load(key, ScalarType.Float32);
            Assert.True(a.shape.SequenceEqual(b.shape), key);
            Assert.True(Same(a, b), $"{key} differs");
        }
    }

    /// <summary>single file → diffusers folder → same weights, same configs (what the reference folder says).</summary>
    [Theory]
    [MemberData(nameof(SetNames))]
    public void Single_file_saved_as_a_diffusers_folder_reloads_with_the_reference_configs_and_weights(string set)
    {
        using var tmp = new TempDir();
        var model = SdReference.Model(set, "single_file");
        model.SaveDiffusers(tmp.Path);
        using var reloaded = StableDiffusionModel.FromDiffusers(tmp.Path);
        Assert.All(reloaded.LoadReports, r => Assert.True(r.IsComplete && r.Unexpected.Count == 0, r.ToString()));
        var reference = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set));
        Assert.Equal(reference.Family, reloaded.Family);
        Assert.Equal(reference.Unet.ToJson(), reloaded.Config.Unet.ToJson());
        Assert.Equal(reference.Vae!.ToJson(), reloaded.Config.Vae!.ToJson());
        Assert.Equal(reference.TextEncoder?.ToJson(), reloaded.Config.TextEncoder?.ToJson());
        Assert.Equal(reference.TextEncoder2?.ToJson(), reloaded.Config.TextEncoder2?.ToJson());
        Assert.True(File.Exists(Path.Combine(tmp.Path, "model_index.json")));
        using var scope = NewDisposeScope();
        var expected = model.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        Assert.Equal(expected.Count, reloaded.named_parameters().Count());
        foreach (var (name, p) in reloaded.named_parameters())
            Assert.True(Same(p, expected[name]), name);
    }

    [Fact]
    public void Missing_tensor_is_reported_with_file_and_key()
    {
        using var tmp = new TempDir();
        var path = tmp.File("broken.safetensors");
        using (var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd")))
            SafetensorsWriter.Write(path, src.Keys.Where(k => k != "model.diffusion_model.out.2.weight").Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k))));
        var e = Assert.Throws<LoraSharpException>(() => StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sd")) }));
        Assert.Equal(Path.GetFullPath(path), e.FilePath);
        Assert.Contains("conv_out.weight (file key model.diffusion_model.out.2.weight)", e.Message);
        Assert.Contains("1 parameters missing", e.Message);
    }

    [Fact]
    public void Mis_shaped_tensor_is_reported_with_both_shapes()
    {
        using var tmp = new TempDir();
        var path = tmp.File("broken.safetensors");
        using (var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd")))
            SafetensorsWriter.Write(path, src.Keys.Select(k => new KeyValuePair<string, Tensor>(k,
                k == "first_stage_model.quant_conv.bias" ? zeros(7) : src.Load(k))));
        var e = Assert.Throws<LoraSharpException>(() => StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sd")) }));
        Assert.Contains("quant_conv.bias: file key first_stage_model.quant_conv.bias [7]", e.Message);
        Assert.Contains("expected [8]", e.Message);
    }

    [Fact]
    public void Unexpected_tensor_is_listed_and_refused_when_asked()
    {
        using var tmp = new TempDir();
        var path = tmp.File("extra.safetensors");
        using (var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd")))
            SafetensorsWriter.Write(path, src.Keys.Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k)))
                .Append(new("model.diffusion_model.extra_block.weight", ones(3))));
        var options = new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sd")) };
        using (var model = StableDiffusionCheckpoint.Load(path, options))
            Assert.Equal(["model.diffusion_model.extra_block.weight"], model.LoadReports.Single(r => r.Component == "file").Unexpected);
        var e = Assert.Throws<LoraSharpException>(() => StableDiffusionCheckpoint.Load(path, options with { ThrowOnUnexpected = true }));
        Assert.Contains("model.diffusion_model.extra_block.weight", e.Message);
    }

    [Fact]
    public void Ema_weights_are_ignored_by_default_and_loaded_on_request()
    {
        using var tmp = new TempDir();
        var path = tmp.File("ema.safetensors");
        using (var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd")))
        {
            var unetKeys = src.Keys.Where(k => k.StartsWith(StableDiffusionCheckpoint.UNetRoot, StringComparison.Ordinal));
            SafetensorsWriter.Write(path, src.Keys.Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k)))
                .Concat(unetKeys.Select(k => new KeyValuePair<string, Tensor>(StableDiffusionCheckpoint.EmaKey(k), src.Load(k) + 1)))
                .Append(new("model_ema.num_updates", tensor(5L))));
        }
        Assert.Equal("model_ema.diffusion_modelinput_blocks00weight", StableDiffusionCheckpoint.EmaKey("model.diffusion_model.input_blocks.0.0.weight"));
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sd"));
        using var plain = StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = config, LoadVae = false, LoadTextEncoders = false });
        using var ema = StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = config, UseEma = true, LoadVae = false, LoadTextEncoders = false });
        Assert.Empty(plain.LoadReports.Single(r => r.Component == "file").Unexpected);
        Assert.Contains("model_ema.num_updates", plain.LoadReports.Single(r => r.Component == "file").Ignored);
        Assert.Empty(ema.LoadReports.Single(r => r.Component == "file").Unexpected);
        Assert.Null(plain.Vae);
        Assert.Null(plain.TextEncoder);
        using var scope = NewDisposeScope();
        var reference = SdReference.Model("sd", "diffusers").Unet.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in plain.Unet.named_parameters())
            Assert.True(Same(p, reference[name]), name);
        foreach (var (name, p) in ema.Unet.named_parameters())
            Assert.True(Same(p, reference[name] + 1), name);
    }

    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void Loading_in_half_precision_converts_every_tensor_and_runs(ScalarType dtype)
    {
        using var model = StableDiffusionModel.FromDiffusers(SdReference.DiffusersDir("sd"), new StableDiffusionLoadOptions { DType = dtype });
        Assert.All(model.parameters(), p => Assert.Equal(dtype, p.dtype));
        var reference = SdReference.Model("sd", "diffusers");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // The token embeddings are stored in fp16: to fp16 exactly, to bf16 rounded once.
        var tok32 = reference.TextEncoder!.get_parameter("text_model.embeddings.token_embedding.weight")!;
        Assert.True(Same(model.TextEncoder!.get_parameter("text_model.embeddings.token_embedding.weight")!, tok32.to_type(dtype)));
        using var file = SafetensorsFile.Open(SdReference.PathOf("sd", "forward/unet_ref.safetensors"));
        var output = model.Unet.Predict(file.Load("unet_latents", dtype), file.Load("unet_timesteps"), file.Load("unet_ehs", dtype));
        Assert.Equal(dtype, output.dtype);
        var expected = file.Load("unet_out");
        double relative = ((output.to_type(ScalarType.Float32) - expected).norm() / expected.norm()).item<float>();
        Assert.True(relative < 0.05, $"relative error {relative} in {dtype}");
    }

    /// <summary>The kohya SDXL reference records, for every LoRA module, the SGM tensor it addresses (built by the
    /// generator from kohya's own naming): the single-file key map must agree for all of them.</summary>
    [Fact]
    public void Single_file_key_map_agrees_with_the_kohya_sdxl_name_map()
    {
        var model = SdReference.Model("sdxl", "diffusers");
        var map = StableDiffusionCheckpoint.SingleFileKeyMap(model);
        using (var file = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sdxl")))
        {
            var fromHeaders = StableDiffusionCheckpoint.SingleFileKeyMap(file);
            Assert.Equal(map.Keys.Order(), fromHeaders.Keys.Order());
            Assert.All(map, kv => Assert.Equal(kv.Value, fromHeaders[kv.Key]));
        }
        var unetMap = LdmKeyMap.ForUNet(model.Config.Unet);
        var nameMap = ReferenceData.ReadJson("sdxl", "lora", "kohya_lora_ref.json")["name_map"]!.AsObject();
        Assert.NotEmpty(nameMap);
        foreach (var (loraName, entry) in nameMap)
        {
            var component = entry!["component"]!.GetValue<string>() switch { "te1" => "text_encoder", "te2" => "text_encoder_2", var c => c };
            var module = entry["module"]!.GetValue<string>();
            var sgmKey = entry["sgm_key"]!.GetValue<string>();
            var slice = entry["sgm_qkv_slice"];
            var m = map[$"{component}.{module}.weight"];
            Assert.Equal(sgmKey, m.Source);
            if (slice is null) Assert.NotEqual(TensorTransform.FusedQkvChunk, m.Transform);
            else Assert.Equal((TensorTransform.FusedQkvChunk, slice.GetValue<int>()), (m.Transform, m.Chunk));
            if (component == "unet")
            {
                var sgmModule = sgmKey[StableDiffusionCheckpoint.UNetRoot.Length..^".weight".Length];
                Assert.Equal(module, unetMap.ToDiffusers(sgmModule));
                Assert.Equal("lora_unet_" + sgmModule.Replace('.', '_'), loraName);
            }
        }
    }

    [Fact]
    public void Sd1_file_with_text_encoder_keys_without_text_model_level_loads()
    {
        using var tmp = new TempDir();
        var path = tmp.File("old_te.safetensors");
        const string nested = StableDiffusionCheckpoint.Sd1TextRoot + "text_model.";
        using (var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd")))
            SafetensorsWriter.Write(path, src.Keys.Select(k => new KeyValuePair<string, Tensor>(
                k.StartsWith(nested, StringComparison.Ordinal) ? StableDiffusionCheckpoint.Sd1TextRoot + k[nested.Length..] : k, src.Load(k))));
        using var model = StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = SdReference.DerivedConfig("sd", path), LoadVae = false });
        Assert.Empty(model.LoadReports.Single(r => r.Component == "file").Unexpected);
        using var scope = NewDisposeScope();
        var reference = SdReference.Model("sd", "diffusers").TextEncoder!.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in model.TextEncoder!.named_parameters())
            Assert.True(Same(p, reference[name]), name);
    }

    [Theory]
    [MemberData(nameof(SetNames))]
    public void Describe_of_the_diffusers_folder_names_family_and_components(string set)
    {
        var text = StableDiffusionCheckpoint.Describe(SdReference.DiffusersDir(set));
        var model = SdReference.Model(set, "diffusers");
        Assert.Contains("Family: " + StableDiffusionCheckpoint.FamilyName(model.Family), text);
        Assert.Contains("diffusers folder", text);
        Assert.Contains($"({StableDiffusionModel.ParameterCount(model):N0})", text);
        Assert.Equal(model.TextEncoder2 is not null, text.Contains("text_encoder_2", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("ldm_without_root")]
    [InlineData("ldm_with_root")]
    [InlineData("diffusers_folder")]
    public void Standalone_vae_file_loads_in_ldm_or_diffusers_layout(string layout)
    {
        using var tmp = new TempDir();
        var reference = SdReference.Model("sd", "diffusers").Vae!;
        var folderConfig = VaeConfig.FromJsonFile(Path.Combine(SdReference.DiffusersDir("sd"), "vae", "config.json"));
        string path;
        VaeConfig? config = null;
        if (layout == "diffusers_folder")
        {
            path = Path.Combine(SdReference.DiffusersDir("sd"), "vae");
        }
        else
        {
            path = tmp.File("model.vae.safetensors");
            using var src = StableDiffusionCheckpoint.Open(SdReference.SingleFile("sd"));
            var root = StableDiffusionCheckpoint.VaeRoot;
            SafetensorsWriter.Write(path, src.Keys.Where(k => k.StartsWith(root, StringComparison.Ordinal))
                .Select(k => new KeyValuePair<string, Tensor>(layout == "ldm_with_root" ? k : k[root.Length..], src.Load(k))));
            config = folderConfig with { }; // group count cannot be derived from shapes
        }
        using var vae = StableDiffusionCheckpoint.LoadVae(path, config);
        Assert.Equal(folderConfig.BlockOutChannels, vae.Config.BlockOutChannels);
        using var scope = NewDisposeScope();
        var expected = reference.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in vae.named_parameters())
            Assert.True(Same(p, expected[name]), name);
        if (layout == "ldm_without_root")
        {
            using var derived = StableDiffusionCheckpoint.LoadVae(path); // derived config: shapes right, 32 groups
            Assert.Equal(folderConfig.BlockOutChannels, derived.Config.BlockOutChannels);
            Assert.Equal(32, derived.Config.NormNumGroups);
        }
    }

    [Fact]
    public void Sharded_diffusers_component_loads_through_its_index()
    {
        using var tmp = new TempDir();
        var dir = SdReference.DiffusersDir("sd");
        var unetDir = Directory.CreateDirectory(Path.Combine(tmp.Path, "unet")).FullName;
        File.Copy(Path.Combine(dir, "unet", "config.json"), Path.Combine(unetDir, "config.json"));
        var weightMap = new Dictionary<string, string>();
        using (var src = SafetensorsFile.Open(Path.Combine(dir, "unet", "diffusion_pytorch_model.safetensors")))
        {
            var keys = src.Keys.ToArray();
            for (int part = 0; part < 2; part++)
            {
                var shard = $"diffusion_pytorch_model-0000{part + 1}-of-00002.safetensors";
                var mine = keys.Where((_, i) => i % 2 == part).ToArray();
                SafetensorsWriter.Write(Path.Combine(unetDir, shard), mine.Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k))));
                foreach (var k in mine) weightMap[k] = shard;
            }
        }
        File.WriteAllText(Path.Combine(unetDir, "diffusion_pytorch_model.safetensors.index.json"),
            System.Text.Json.JsonSerializer.Serialize(new { metadata = new { total_size = 0 }, weight_map = weightMap }));
        using var model = StableDiffusionModel.FromDiffusers(tmp.Path);
        Assert.Null(model.TextEncoder);
        Assert.Null(model.Vae);
        using var scope = NewDisposeScope();
        var expected = SdReference.Model("sd", "diffusers").Unet.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in model.Unet.named_parameters())
            Assert.True(Same(p, expected[name]), name);

        File.Delete(Path.Combine(unetDir, "diffusion_pytorch_model-00002-of-00002.safetensors"));
        var e = Assert.Throws<LoraSharpException>(() => StableDiffusionModel.FromDiffusers(tmp.Path));
        Assert.Contains("00002-of-00002", e.Message);
    }

    [Fact]
    public void Vae_can_keep_its_own_dtype_and_components_convert_their_inputs()
    {
        using var model = StableDiffusionModel.FromDiffusers(SdReference.DiffusersDir("sdxl"),
            new StableDiffusionLoadOptions { DType = ScalarType.BFloat16, VaeDType = ScalarType.Float32 });
        Assert.All(model.Unet.parameters(), p => Assert.Equal(ScalarType.BFloat16, p.dtype));
        Assert.All(model.Vae!.parameters(), p => Assert.Equal(ScalarType.Float32, p.dtype));
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var file = SafetensorsFile.Open(SdReference.PathOf("sdxl", "forward/vae_ref.safetensors"));
        var decoded = model.Vae.Decode(file.Load("vae_latents", ScalarType.BFloat16));
        Assert.Equal(ScalarType.Float32, decoded.dtype);
        using var unetFile = SafetensorsFile.Open(SdReference.PathOf("sdxl", "forward/unet_ref.safetensors"));
        var eps = model.Unet.Predict(unetFile.Load("unet_latents"), unetFile.Load("unet_timesteps"), unetFile.Load("unet_context"),
            unetFile.Load("unet_text_embeds"), unetFile.Load("unet_time_ids"));
        Assert.Equal(ScalarType.BFloat16, eps.dtype);
        var expected = unetFile.Load("unet_out");
        double relative = ((eps.to_type(ScalarType.Float32) - expected).norm() / expected.norm()).item<float>();
        Assert.True(relative < 0.05, $"relative error {relative}");
    }

    [Fact]
    public void Upcast_attention_in_half_precision_stays_close_to_float32()
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sd"));
        using var model = StableDiffusionModel.FromDiffusers(SdReference.DiffusersDir("sd"), new StableDiffusionLoadOptions { DType = ScalarType.Float16, LoadVae = false, LoadTextEncoders = false });
        using var upcast = new UNet2DConditionModel(config.Unet with { UpcastAttention = true }, dtype: ScalarType.Float16);
        using (no_grad())
            foreach (var (name, p) in upcast.named_parameters())
                p.copy_(model.Unet.get_parameter(name)!);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var file = SafetensorsFile.Open(SdReference.PathOf("sd", "forward/unet_ref.safetensors"));
        var expected = file.Load("unet_out");
        var eps = upcast.Predict(file.Load("unet_latents"), file.Load("unet_timesteps"), file.Load("unet_ehs"));
        double relative = ((eps.to_type(ScalarType.Float32) - expected).norm() / expected.norm()).item<float>();
        Assert.True(relative < 0.01, $"relative error {relative}");
    }

    [Theory]
    [MemberData(nameof(SetNames))]
    public void Describe_names_family_components_and_parameter_counts(string set)
    {
        using var source = StableDiffusionCheckpoint.Open(SdReference.SingleFile(set));
        var text = StableDiffusionCheckpoint.Describe(source);
        var model = SdReference.Model(set, "diffusers");
        Assert.Contains("Family: " + StableDiffusionCheckpoint.FamilyName(model.Family), text);
        Assert.Contains("unet", text);
        Assert.Contains("vae", text);
        Assert.Contains("text_encoder", text);
        long total = StableDiffusionModel.ParameterCount(model);
        Assert.Contains($"({total:N0})", text);
        Assert.Contains($"context {model.Config.Unet.CrossAttentionDim}", text);
    }
}
