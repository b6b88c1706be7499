using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.StableDiffusion;
using LoraSharp.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

/// <summary>Shared pieces of the txt2img tests: the tiny SD1 model, its tokenizer and a LoRA folder with reference LoRAs.</summary>
static class Txt2ImgFixture
{
    public static readonly Lazy<ClipTokenizer> Tokenizer = new(() => ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer")));

    public static JsonObject Samplers => ReferenceData.ReadJson("sd", "manifest.json")["samplers"]!.AsObject();

    public static string ModelDir => SdReference.DiffusersDir("sd");

    /// <summary>A fresh model (LoRA tests change hooks and weights).</summary>
    public static StableDiffusionModel FreshModel() => StableDiffusionModel.FromDiffusers(ModelDir);

    /// <summary>A LoRA folder holding the reference kohya LoRA as <c>style</c> and the LoCon as <c>sub/locon</c>.</summary>
    public static TempDir LoraFolder()
    {
        var tmp = new TempDir();
        File.Copy(ReferenceData.PathOf("sd", "lora", "kohya_lora.safetensors"), tmp.File("style.safetensors"));
        Directory.CreateDirectory(tmp.File("sub"));
        File.Copy(ReferenceData.PathOf("sd", "lora", "kohya_locon.safetensors"), Path.Combine(tmp.Path, "sub", "locon.safetensors"));
        return tmp;
    }

    public static Txt2ImgPipeline Pipeline(StableDiffusionModel model, string? loraDir = null) =>
        new(model, Tokenizer.Value, loras: loraDir is null ? null : LoraLibrary.Open(loraDir),
            schedule: Txt2ImgPipeline.ScheduleOf(ModelDir, null));

    /// <summary>The reference run: 'a photo of a cat', negative '', CFG 7, 20 steps, seed 1334, 128×128 (latents 16×16).</summary>
    public static Txt2ImgRequest Reference(string sampler = "euler", int steps = 20) => new()
    {
        Prompt = (string)Samplers["prompt"]!,
        NegativePrompt = (string)Samplers["negative_prompt"]!,
        CfgScale = (double)Samplers["guidance_scale"]!,
        Steps = steps,
        Seed = (long)Samplers["generator_seed"]!,
        Sampler = sampler,
        Width = 8 * (int)Samplers["latent_shape"]![3]!,
        Height = 8 * (int)Samplers["latent_shape"]![2]!,
    };

    public static double MaxDiff(Tensor a, Tensor b)
    {
        Assert.Equal(a.shape, b.shape);
        using var d = (a - b).abs().max();
        return d.item<float>();
    }
}

public class Txt2ImgPipelineTests(Xunit.Abstractions.ITestOutputHelper output)
{
    static readonly Lazy<StableDiffusionModel> SharedModel = new(Txt2ImgFixture.FreshModel);

    public static TheoryData<string> SamplerCases()
    {
        var data = new TheoryData<string>();
        foreach (var c in Txt2ImgFixture.Samplers["cases"]!.AsArray()) data.Add((string)c!["name"]!);
        return data;
    }

    [Theory]
    [MemberData(nameof(SamplerCases))]
    public void Pipeline_reproduces_the_diffusers_reference_image_and_latents(string name)
    {
        var c = Txt2ImgFixture.Samplers["cases"]!.AsArray().Single(x => (string)x!["name"]! == name)!;
        var tol = ReferenceData.ReadJson("sd", "manifest.json")["tolerances"]!["sampler"]!;
        double atol = (double)tol["atol"]!;
        using var file = SafetensorsFile.Open(ReferenceData.PathOf("sd", (string)c["file"]!));
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        var steps = new List<StepInfo>();
        using var result = pipe.Generate(Txt2ImgFixture.Reference(name), new SyncProgress<StepInfo>(steps.Add));
        using var scope = NewDisposeScope();

        Assert.Equal(20, steps.Count);
        Assert.Equal(Enumerable.Range(1, 20), steps.Select(s => s.Step));
        var latents = file.Load("latents_after_step")[19].unsqueeze(0);
        double dl = Txt2ImgFixture.MaxDiff(latents, result.Latents);
        double di = Txt2ImgFixture.MaxDiff(file.Load("decoded_image"), result.Images!);
        output.WriteLine($"{name}: max |Δ latents| = {dl:g3}, max |Δ image| = {di:g3}");
        Assert.True(dl <= atol, $"final latents differ by {dl:g3} > {atol}");
        Assert.True(di <= atol, $"decoded image differs by {di:g3} > {atol}");
        Assert.Equal(1334, result.Seeds.Single());
        Assert.Equal("1334", result.Parameters[0].Get("Seed"));
        Assert.Equal("128x128", result.Parameters[0].Get("Size"));
    }

    [Fact]
    public void Prompt_embedding_equals_the_recorded_text_encoder_conditioning()
    {
        var c = Txt2ImgFixture.Samplers["cases"]!.AsArray()[0]!;
        using var file = SafetensorsFile.Open(ReferenceData.PathOf("sd", (string)c["file"]!));
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        using var scope = NewDisposeScope();
        var embeds = file.Load("prompt_embeds");
        using var uncond = pipe.EncodePrompt("", isNegative: true);
        using var cond = pipe.EncodePrompt("a photo of a cat");
        Assert.True(Txt2ImgFixture.MaxDiff(embeds[0].unsqueeze(0), uncond.Context) <= 1e-4);
        Assert.True(Txt2ImgFixture.MaxDiff(embeds[1].unsqueeze(0), cond.Context) <= 1e-4);
    }

    [Fact]
    public void Batch_image_i_equals_a_single_run_with_seed_plus_i()
    {
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        var request = Txt2ImgFixture.Reference("euler_a", steps: 6) with { Seed = 77 };
        using var batch = pipe.Generate(request with { BatchSize = 2 });
        using var single = pipe.Generate(request with { Seed = 78 });
        Assert.Equal(new long[] { 77, 78 }, batch.Seeds);
        Assert.Equal("78", batch.Parameters[1].Get("Seed"));
        using var scope = NewDisposeScope();
        double d = Txt2ImgFixture.MaxDiff(single.Images!, batch.Images!.narrow(0, 1, 1));
        Assert.True(d <= 1e-4, $"image 1 of the batch differs from the single run by {d:g3}");
        Assert.True(Txt2ImgFixture.MaxDiff(batch.Images!.narrow(0, 0, 1), batch.Images!.narrow(0, 1, 1)) > 1e-2);
    }

    [Fact]
    public void Long_negative_prompt_runs_the_halves_separately_unless_padded()
    {
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        var longNegative = string.Join(", ", Enumerable.Repeat("blurry ugly", 40));
        // The tiny encoder's final LayerNorm (weight 1, bias 0) makes the second chunk's mean exactly 0: "Original" emphasis
        // would divide 0 by 0 (A1111 too); the pipeline skips emphasis for prompts without weights.
        var request = Txt2ImgFixture.Reference("euler", steps: 3) with { NegativePrompt = longNegative };
        using var separate = pipe.Generate(request);
        using var padded = pipe.Generate(request with { PadCondUncond = true });
        using var scope = NewDisposeScope();
        using (var neg = pipe.EncodePrompt(longNegative, isNegative: true, emphasis: request.Emphasis)) Assert.Equal(2, neg.Chunks);
        output.WriteLine($"separate vs padded: {Txt2ImgFixture.MaxDiff(separate.Images!, padded.Images!):g3}");
        Assert.True(separate.Images!.isfinite().all().item<bool>());
        Assert.True(Txt2ImgFixture.MaxDiff(separate.Images!, padded.Images!) > 0, "padding the shorter conditioning changes the cross-attention");
    }

    [Fact]
    public void Invalid_requests_fail_before_any_work()
    {
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Txt2ImgFixture.Reference() with { Width = 100 }));
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Txt2ImgFixture.Reference() with { Sampler = "PLMS" }));
        var e = Assert.Throws<LoraSharpException>(() => pipe.Generate(Txt2ImgFixture.Reference() with { Prompt = "cat <lora:style:1>" }));
        Assert.Contains("no LoRA folder", e.Message);
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Txt2ImgFixture.Reference() with { Prompt = "cat <lora:style:abc>" }));
    }

    [Fact]
    public void Schedule_takes_betas_and_prediction_from_the_model_but_not_the_saved_spacing()
    {
        using var tmp = new TempDir();
        Directory.CreateDirectory(tmp.File("scheduler"));
        File.WriteAllText(tmp.File("scheduler/scheduler_config.json"),
            """{"_class_name": "PNDMScheduler", "beta_start": 0.001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}""");
        var s = Txt2ImgPipeline.ScheduleOf(tmp.Path, null);
        Assert.Equal(PredictionType.VPrediction, s.Prediction);
        Assert.Equal(0.001, s.BetaStart);
        Assert.Null(s.Spacing);
        File.WriteAllText(tmp.File("m.safetensors"), "");
        Assert.Equal(PredictionType.Epsilon, Txt2ImgPipeline.ScheduleOf(null, tmp.File("m.safetensors")).Prediction);
        File.WriteAllText(tmp.File("m.yaml"), "model:\n  params:\n    parameterization: \"v\"\n");
        Assert.Equal(PredictionType.VPrediction, Txt2ImgPipeline.ScheduleOf(null, tmp.File("m.safetensors")).Prediction);
    }

    [Fact]
    public void V_prediction_changes_the_sampling_of_the_same_model()
    {
        using var pipe = Txt2ImgFixture.Pipeline(SharedModel.Value);
        var request = Txt2ImgFixture.Reference("ddim", steps: 4);
        using var eps = pipe.Generate(request);
        using var v = pipe.Generate(request with { Prediction = PredictionType.VPrediction });
        using var scope = NewDisposeScope();
        Assert.True(v.Latents.isfinite().all().item<bool>());
        Assert.True(Txt2ImgFixture.MaxDiff(eps.Latents, v.Latents) > 1e-3);
    }

    sealed class SyncProgress<T>(Action<T> action) : IProgress<T>
    {
        public void Report(T value) => action(value);
    }
}

/// <summary>LoRAs in the prompt: weights, merged vs unmerged, names, LoRA Block Weight.</summary>
public class Txt2ImgLoraTests(Xunit.Abstractions.ITestOutputHelper output)
{
    const int Steps = 8;

    static Txt2ImgRequest Request(string prompt, bool merged = false) =>
        Txt2ImgFixture.Reference("dpmpp_2m_karras", Steps) with { Prompt = prompt, MergeLoras = merged };

    static Tensor Image(Txt2ImgPipeline pipe, string prompt, bool merged = false)
    {
        using var r = pipe.Generate(Request(prompt, merged));
        return r.Images!.clone();
    }

    [Fact]
    public void Lora_at_weight_zero_gives_the_base_image_exactly_and_at_one_the_manually_attached_image()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var scope = NewDisposeScope();
        var baseImage = Image(pipe, "a photo of a cat");
        var zero = Image(pipe, "a photo of a cat <lora:style:0>");
        var one = Image(pipe, "a photo of a cat <lora:style:1>");
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(baseImage, zero));
        double changed = Txt2ImgFixture.MaxDiff(baseImage, one);
        output.WriteLine($"LoRA 1.0 vs base: {changed:g3}");
        Assert.True(changed > 1e-2);
        // The run left the model untouched.
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(baseImage, Image(pipe, "a photo of a cat")));

        using var host = new AdapterHost(model);
        StableDiffusionLoras.Attach(host, model, Path.Combine(loras.Path, "style.safetensors"), "manual", 1, 1);
        var manual = Image(pipe, "a photo of a cat");
        double d = Txt2ImgFixture.MaxDiff(one, manual);
        Assert.True(d <= 1e-6, $"prompt LoRA vs manually attached LoRA: {d:g3}");
    }

    [Fact]
    public void Merged_and_unmerged_loras_give_the_same_image()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        using var scope = NewDisposeScope();
        const string prompt = "a photo of a cat <lora:style:0.8> <lora:locon:0.5:1>";
        var unmerged = Image(pipe, prompt);
        var merged = Image(pipe, prompt, merged: true);
        double d = Txt2ImgFixture.MaxDiff(unmerged, merged);
        output.WriteLine($"merged vs unmerged: {d:g3}");
        Assert.True(d <= 1e-4, $"merged vs unmerged: {d:g3}");
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.equal(before[name]).all().item<bool>(), $"{name} not restored after the merged run");
    }

    [Fact]
    public void Kept_loras_are_reused_and_dropped_when_no_longer_requested()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var scope = NewDisposeScope();
        var fresh = Image(pipe, "a photo of a cat <lora:style:0.7>", merged: true);
        using (var r = pipe.Generate(Request("a photo of a cat <lora:style:1>", merged: true) with { KeepLorasLoaded = true })) { }
        using (var r = pipe.Generate(Request("a photo of a cat <lora:style:0.7>", merged: true) with { KeepLorasLoaded = true }))
            Assert.True(Txt2ImgFixture.MaxDiff(fresh, r.Images!) <= 1e-5);
        var baseImage = Image(pipe, "a photo of a cat");
        using var plain = Txt2ImgFixture.FreshModel();
        using var plainPipe = Txt2ImgFixture.Pipeline(plain);
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(Image(plainPipe, "a photo of a cat"), baseImage));
    }

    [Fact]
    public void A_broken_lora_file_fails_the_run_and_leaves_the_model_as_it_was()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        File.WriteAllBytes(Path.Combine(loras.Path, "broken.safetensors"), [1, 2, 3]);
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var scope = NewDisposeScope();
        var baseImage = Image(pipe, "a photo of a cat");
        var e = Assert.Throws<LoraSharpException>(() => pipe.Generate(Request("a photo of a cat <lora:style:1> <lora:broken:1>", merged: true)));
        Assert.Contains("broken.safetensors", e.Message + e.FilePath);
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(baseImage, Image(pipe, "a photo of a cat")));
    }

    [Theory]
    [InlineData("<lora:../style:1>")]
    [InlineData("<lora:..\\style:1>")]
    [InlineData("<lora:sub/locon:1>")]
    [InlineData("<lora:/etc/passwd:1>")]
    [InlineData("<lora:C\\:style:1>")]
    public void Hostile_lora_names_are_refused(string tag)
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        var e = Assert.Throws<LoraSharpException>(() => pipe.Generate(Request("cat " + tag)));
        output.WriteLine(e.Message);
    }

    [Fact]
    public void Lora_hashes_are_the_addnet_short_hashes_of_the_files()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var r = pipe.Generate(Request("cat <lora:style:0.5>") with { Steps = 2 });
        using var file = SafetensorsFile.Open(Path.Combine(loras.Path, "style.safetensors"));
        Assert.Equal($"style: {file.Metadata["sshs_model_hash"][..12]}", r.Parameters[0].Get("Lora hashes"));
        Assert.Equal("cat <lora:style:0.5>", r.Parameters[0].Prompt);
    }

    [Fact]
    public void Block_weights_of_all_ones_equal_no_block_weights()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var scope = NewDisposeScope();
        var plain = Image(pipe, "a photo of a cat <lora:style:0.9>");
        var ones = Image(pipe, "a photo of a cat <lora:style:0.9:lbw=ALL>");
        var onesVector = Image(pipe, "a photo of a cat <lora:style:0.9:lbw=" + string.Join(",", Enumerable.Repeat("1", 26)) + ">");
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(plain, ones));
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(plain, onesVector));
    }

    [Fact]
    public void Block_weights_zero_on_every_unet_block_equal_a_text_encoder_only_lora()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        using var scope = NewDisposeScope();
        var teOnly = Image(pipe, "a photo of a cat <lora:style:1:0>");
        var lbw = Image(pipe, "a photo of a cat <lora:style:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0>");
        var full = Image(pipe, "a photo of a cat <lora:style:1>");
        Assert.Equal(0.0, Txt2ImgFixture.MaxDiff(teOnly, lbw));
        Assert.True(Txt2ImgFixture.MaxDiff(full, lbw) > 1e-3);
        // A preset in the old positional syntax: OUTD keeps BASE and OUT03-OUT06.
        var outd = Image(pipe, "a photo of a cat <lora:style:1:OUTD>");
        Assert.True(Txt2ImgFixture.MaxDiff(outd, lbw) > 1e-4);
        Assert.True(Txt2ImgFixture.MaxDiff(outd, full) > 1e-4);
    }

    [Fact]
    public void Block_weight_vector_of_the_wrong_layout_is_refused()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var model = Txt2ImgFixture.FreshModel();
        using var pipe = Txt2ImgFixture.Pipeline(model, loras.Path);
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Request("cat <lora:style:1:lbw=1,1,1>")));
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Request("cat <lora:style:1:lbw=1,1,1,1,1,1,1,1,1,1,1,1>")));
        Assert.Throws<LoraSharpException>(() => pipe.Generate(Request("cat <lora:style:1:lbw=NOPRESET>")));
    }
}
