using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Tests.StableDiffusion;

public class ModuleStructureTests
{
    public static TheoryData<string, string> Components()
    {
        var data = new TheoryData<string, string>();
        foreach (var set in SdReference.Sets)
            foreach (var component in SdReference.Manifest(set).GetProperty("model").GetProperty("components").EnumerateObject())
                if (component.Name != "scheduler")
                    data.Add(set, component.Name);
        return data;
    }

    static nn.Module Build(StableDiffusionConfig config, string component) => component switch
    {
        "unet" => new UNet2DConditionModel(config.Unet),
        "vae" => new AutoencoderKL(config.Vae!),
        "text_encoder" => new ClipTextModel(config.TextEncoder!),
        "text_encoder_2" => new ClipTextModel(config.TextEncoder2!),
        _ => throw new ArgumentException(component),
    };

    [Theory]
    [MemberData(nameof(Components))]
    public void Parameter_names_and_shapes_equal_the_diffusers_checkpoint(string set, string component)
    {
        var dir = SdReference.DiffusersDir(set);
        var config = StableDiffusionConfig.FromDiffusersFolder(dir);
        using var module = Build(config, component);
        using var file = SafetensorsFile.Open(StableDiffusionModel.WeightsFile(Path.Combine(dir, component)));
        var parameters = module.named_parameters().ToDictionary(p => p.name, p => p.parameter.shape);
        var fileKeys = file.Keys.Where(k => !StableDiffusionModel.IsIgnorable(k)).ToHashSet();
        Assert.Empty(fileKeys.Except(parameters.Keys).Order());
        Assert.Empty(parameters.Keys.Except(fileKeys).Order());
        foreach (var (name, shape) in parameters)
            Assert.True(shape.SequenceEqual(file.Info(name).Shape), $"{name}: [{string.Join(",", shape)}] vs file [{string.Join(",", file.Info(name).Shape)}]");
    }

    /// <summary>Adapters attach with forward hooks, which only run when a module is invoked with call().</summary>
    [Theory]
    [InlineData("sd")]
    [InlineData("sdxl")]
    public void Every_linear_and_conv_is_invoked_through_call_so_hooks_fire(string set)
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set));
        using var model = new StableDiffusionModel(config);
        var fired = new HashSet<string>();
        var handles = new List<IDisposable>();
        foreach (var (name, module) in model.named_modules())
        {
            var captured = name;
            if (module is Linear linear)
                linear.register_forward_hook((m, input, output) => { lock (fired) fired.Add(captured); return output; });
            else if (module is Conv2d conv)
                conv.register_forward_hook((m, input, output) => { lock (fired) fired.Add(captured); return output; });
        }
        var expected = model.named_modules().Where(m => m.module is Linear or Conv2d).Select(m => m.name).ToList();
        Assert.NotEmpty(expected);

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = randint(0, 49407, [2, 77], dtype: ScalarType.Int64);
        using var o1 = model.TextEncoder!.call(ids);
        var ctx = o1.LastHiddenState;
        Tensor? textEmbeds = null, timeIds = null;
        if (model.TextEncoder2 is not null)
        {
            using var o2 = model.TextEncoder2.call(ids);
            ctx = cat([o1.HiddenStates[^2], o2.HiddenStates[^2]], -1);
            textEmbeds = o2.TextEmbeds!.alias();
            timeIds = tensor(new float[] { 128, 128, 0, 0, 128, 128, 256, 192, 16, 8, 128, 128 }).reshape(2, 6);
        }
        var latents = randn(2, 4, 8, 8);
        var eps = model.Unet.Predict(latents, tensor(new long[] { 10, 500 }), ctx, textEmbeds, timeIds);
        Assert.Equal(latents.shape, eps.shape);
        Assert.True(eps.isfinite().all().item<bool>());
        var image = randn(1, 3, 64, 64);
        using var dist = model.Vae!.Encode(image);
        long factor = 1L << (config.Vae!.BlockOutChannels.Length - 1);
        Assert.Equal(new long[] { 1, config.Vae.LatentChannels, 64 / factor, 64 / factor }, dist.Mean.shape);
        var decoded = model.Vae.Decode(dist.Mean);
        Assert.Equal(image.shape, decoded.shape);

        Assert.Empty(expected.Except(fired).Order());
    }

    /// <summary>Each module appears once, under its checkpoint path (no second path from C# field names), and a fresh
    /// model's parameters are all finite (norm layers initialised to 1 / 0).</summary>
    [Theory]
    [InlineData("sd")]
    [InlineData("sdxl")]
    public void Every_module_has_one_path_and_fresh_parameters_are_finite(string set)
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir(set));
        using var model = new StableDiffusionModel(config);
        var modules = model.named_modules().ToList();
        Assert.Equal(modules.Count, modules.Select(m => m.module).Distinct(ReferenceEqualityComparer.Instance).Count());
        Assert.DoesNotContain(modules, m => m.name.Split('.').Any(part => part.StartsWith('_')));
        using var scope = NewDisposeScope();
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.isfinite().all().item<bool>(), $"{name} has non-finite values after construction");
        foreach (var (name, m) in modules)
            if (m is GroupNorm norm)
                Assert.True(norm.weight!.eq(1).all().item<bool>() && norm.bias!.eq(0).all().item<bool>(), name);
    }

    /// <summary>Every forward frees its temporaries: after repeated calls (outputs disposed) no tensor is left alive.</summary>
    [Fact]
    public void Repeated_forwards_leave_no_live_tensors()
    {
        var model = SdReference.Model("sdxl", "diffusers");
        using var noGrad = no_grad();
        using var ids = randint(0, 49407, [2, 77], dtype: ScalarType.Int64);
        using var latents = randn(2, 4, 8, 8);
        using var t = tensor(new long[] { 10, 500 });
        using var timeIds = tensor(new float[] { 128, 128, 0, 0, 128, 128, 256, 192, 16, 8, 128, 128 }).reshape(2, 6);
        using var image = randn(1, 3, 32, 32);
        void Step()
        {
            using var o1 = model.TextEncoder!.call(ids);
            using var o2 = model.TextEncoder2!.call(ids);
            using var penultimate = model.TextEncoder.Encode(ids, clipSkip: 2, applyFinalLayerNorm: false);
            using var ctx = cat([o1.HiddenStates[^2], o2.HiddenStates[^2]], -1);
            using var eps = model.Unet.Predict(latents, t, ctx, o2.TextEmbeds, timeIds);
            using var dist = model.Vae!.Encode(image);
            using var sample = dist.Sample();
            using var decoded = model.Vae.Decode(sample);
            using var reconstructed = model.Vae.call(image);
        }
        Step();
        long before = TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount;
        for (int i = 0; i < 5; i++) Step();
        Assert.Equal(before, TorchSharp.DisposeScopeManager.Statistics.ThreadTotalLiveCount);
    }

    /// <summary>Latent sides that do not halve evenly: the up path resizes to each skip's size (diffusers' upsample_size).</summary>
    [Theory]
    [InlineData(10, 14)]
    [InlineData(16, 24)]
    [InlineData(9, 9)]
    public void Unet_accepts_non_square_and_odd_latent_sizes(int height, int width)
    {
        var model = SdReference.Model("sd", "diffusers");
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var latents = randn(1, 4, height, width);
        var eps = model.Unet.Predict(latents, tensor(new long[] { 300 }), randn(1, 77, model.Config.Unet.CrossAttentionDim));
        Assert.Equal(latents.shape, eps.shape);
        Assert.True(eps.isfinite().all().item<bool>());
    }

    [Fact]
    public void Composite_model_names_components_unet_vae_text_encoder_text_encoder_2()
    {
        var config = StableDiffusionConfig.FromDiffusersFolder(SdReference.DiffusersDir("sdxl"));
        using var model = new StableDiffusionModel(config);
        var roots = model.named_children().Select(c => c.name).Order().ToArray();
        Assert.Equal(new[] { "text_encoder", "text_encoder_2", "unet", "vae" }, roots);
        var names = model.named_modules().Select(m => m.name).ToHashSet();
        int level = Array.IndexOf(config.Unet.DownBlockTypes, "CrossAttnDownBlock2D");
        Assert.Contains($"unet.down_blocks.{level}.attentions.0.transformer_blocks.{config.Unet.TransformerLayersPerBlock[level] - 1}.attn2.to_k", names);
        Assert.Contains($"text_encoder_2.text_model.encoder.layers.{config.TextEncoder2!.NumHiddenLayers - 1}.self_attn.q_proj", names);
        Assert.Contains("text_encoder_2.text_projection", names);
        Assert.Contains("vae.decoder.mid_block.attentions.0.to_out.0", names);
    }

    [Theory]
    [InlineData("sd")]
    [InlineData("sdxl")]
    public void Unet_config_json_agrees_with_the_manifest(string set)
    {
        var config = UNetConfig.FromJsonFile(Path.Combine(SdReference.DiffusersDir(set), "unet", "config.json"));
        var m = SdReference.Manifest(set).GetProperty("model").GetProperty("config").GetProperty("unet");
        Assert.Equal(m.GetProperty("block_out_channels").EnumerateArray().Select(e => e.GetInt32()), config.BlockOutChannels);
        var heads = m.GetProperty("attention_head_dim");
        Assert.Equal(heads.ValueKind == System.Text.Json.JsonValueKind.Array
            ? heads.EnumerateArray().Select(e => e.GetInt32()).ToArray()
            : Enumerable.Repeat(heads.GetInt32(), config.BlockOutChannels.Length).ToArray(), config.AttentionHeads);
        Assert.Equal(m.GetProperty("norm_num_groups").GetInt32(), config.NormNumGroups);
        if (m.TryGetProperty("transformer_layers_per_block", out var depth))
            Assert.Equal(depth.EnumerateArray().Select(e => e.GetInt32()), config.TransformerLayersPerBlock);
        if (m.TryGetProperty("use_linear_projection", out var linear))
            Assert.Equal(linear.GetBoolean(), config.UseLinearProjection);
        Assert.Equal(m.TryGetProperty("addition_embed_type", out var add) ? add.GetString() : null, config.AdditionEmbedType);
        if (m.TryGetProperty("addition_time_embed_dim", out var atd))
            Assert.Equal(atd.GetInt32(), config.AdditionTimeEmbedDim);
        if (m.TryGetProperty("projection_class_embeddings_input_dim", out var proj))
            Assert.Equal(proj.GetInt32(), config.ProjectionClassEmbeddingsInputDim);
    }

    [Fact]
    public void Timestep_features_match_diffusers_formula()
    {
        using var scope = NewDisposeScope();
        var f = TimestepFeatures.Sinusoidal(tensor(new long[] { 0, 999 }), 8, flipSinToCos: true, downscaleFreqShift: 0);
        // half = 4, freqs = exp(-ln(1e4) k / 4) = 1, 0.1, 0.01, 0.001; flip → [cos…, sin…]
        var expected = new double[] { Math.Cos(999), Math.Cos(99.9), Math.Cos(9.99), Math.Cos(0.999), Math.Sin(999), Math.Sin(99.9), Math.Sin(9.99), Math.Sin(0.999) };
        var row = f[1].data<float>().ToArray();
        for (int i = 0; i < 8; i++) Assert.Equal(expected[i], row[i], 3);
        Assert.Equal(new float[] { 1, 1, 1, 1, 0, 0, 0, 0 }, f[0].data<float>().ToArray());
    }
}
